"""Client subcommands: every HTTP API route from the command line (`krona trainings …`, `krona adapters …`, …).

The server is ``--url`` (or KRONA_URL, default http://127.0.0.1:8000); the key is ``--api-key`` (or
KRONA_API_KEY, or the `api-key` file that `krona up` writes under ``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")


class ClientError(Exception):
    pass


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("KRONA_URL", "http://127.0.0.1:8000"), help="API base URL")
    parser.add_argument(
        "--api-key", default=os.environ.get("KRONA_API_KEY"), help="API key (default: <data-dir>/api-key)"
    )
    parser.add_argument(
        "--data-dir", default=os.environ.get("KRONA_DATA_DIR", ".krona"), help="where `krona up` keeps data"
    )


def _client(args: argparse.Namespace):
    import httpx

    key = args.api_key
    if not key:
        key_file = Path(args.data_dir) / "api-key"
        if not key_file.is_file():
            raise ClientError(f"no API key: pass --api-key, set KRONA_API_KEY, or run `krona up` (writes {key_file})")
        key = key_file.read_text().strip()
    return httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}, timeout=60.0)


def _check(response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            raise ClientError(f"HTTP {response.status_code} {error['code']}: {error['message']}")
        except (ValueError, KeyError):
            raise ClientError(f"HTTP {response.status_code}: {response.text[:500]}") from None
    if response.status_code == 204 or not response.content:
        return None
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.content


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2))


def wait_for(client, path: str, label: str, show_progress: bool = True) -> dict:
    """Poll ``path`` until a terminal status, with a progress bar for trainings."""
    from tqdm import tqdm

    bar = None
    while True:
        body = _check(client.get(path))
        progress = body.get("progress")
        if show_progress and progress and progress.get("total_steps"):
            if bar is None:
                bar = tqdm(total=progress["total_steps"], desc=label, unit="step", dynamic_ncols=True)
            bar.n = progress["step"]
            if progress.get("loss") is not None:
                bar.set_postfix(loss=f"{progress['loss']:.4f}", eta=f"{progress.get('eta_seconds') or 0:.0f}s")
            bar.refresh()
        if body["status"] in TERMINAL:
            if bar is not None:
                bar.close()
            return body
        time.sleep(0.5)


def trainings(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "create":
            folder = Path(args.images)
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if not files:
                raise ClientError(f"no PNG/JPEG/WebP images in {folder}")
            data = {"instance_prompt": args.prompt}
            if args.params:
                data["params"] = args.params
            if args.name:
                data["name"] = args.name
            if args.webhook_url:
                data["webhook_url"] = args.webhook_url
            headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
            upload = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in files]
            body = _check(client.post("/v1/trainings", data=data, files=upload, headers=headers))
            print(f"training {body['id']} {body['status']} ({len(files)} images)", file=sys.stderr)
            if args.wait:
                body = wait_for(client, f"/v1/trainings/{body['id']}", body["id"])
            _print(body)
            return 0 if body["status"] != "failed" else 1
        if args.action == "get":
            _print(_check(client.get(f"/v1/trainings/{args.id}")))
        elif args.action == "list":
            params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
            if args.cursor:
                params["cursor"] = args.cursor
            _print(_check(client.get("/v1/trainings", params=params)))
        elif args.action == "cancel":
            _print(_check(client.post(f"/v1/trainings/{args.id}/cancel")))
        elif args.action == "wait":
            body = wait_for(client, f"/v1/trainings/{args.id}", args.id)
            _print(body)
            return 0 if body["status"] == "succeeded" else 1
    return 0


def adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            _print(_check(client.get("/v1/adapters", params={"limit": args.limit})))
        elif args.action == "get":
            _print(_check(client.get(f"/v1/adapters/{args.id}")))
        elif args.action == "download":
            data = _check(client.get(f"/v1/adapters/{args.id}/file", params={"format": args.format}))
            out = Path(args.out or f"{args.id}.{args.format}.safetensors")
            out.write_bytes(data)
            print(f"wrote {out} ({len(data):,} bytes, {args.format})")
        elif args.action == "upload":
            path = Path(args.file)
            data = {k: v for k, v in (("name", args.name), ("base_model", args.base_model)) if v}
            files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
            _print(_check(client.post("/v1/adapters", data=data, files=files)))
        elif args.action == "delete":
            _check(client.delete(f"/v1/adapters/{args.id}"))
            print(f"deleted {args.id}")
    return 0


def _download_images(client, body: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in body["images"]:
        path = out_dir / f"{body['id']}-{image['index']}.png"
        path.write_bytes(_check(client.get(f"/v1/generations/{body['id']}/images/{image['index']}")))
        paths.append(path)
    return paths


def generations(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "create":
            request = {"prompt": args.prompt, "num_images": args.num_images, "steps": args.steps}
            for field in (
                "adapter_id",
                "adapter_scale",
                "negative_prompt",
                "guidance_scale",
                "width",
                "height",
                "seed",
            ):
                if getattr(args, field) is not None:
                    request[field] = getattr(args, field)
            headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
            body = _check(client.post("/v1/generations", json=request, headers=headers))
            if args.wait or args.out:
                body = wait_for(client, f"/v1/generations/{body['id']}", body["id"], show_progress=False)
                if args.out and body["status"] == "succeeded":
                    for path in _download_images(client, body, Path(args.out)):
                        print(f"wrote {path}", file=sys.stderr)
            _print(body)
            return 0 if body["status"] != "failed" else 1
        if args.action == "get":
            _print(_check(client.get(f"/v1/generations/{args.id}")))
        elif args.action == "download":
            body = _check(client.get(f"/v1/generations/{args.id}"))
            for path in _download_images(client, body, Path(args.out)):
                print(f"wrote {path}")
    return 0


def batches(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "create":
            request = json.loads(Path(args.file).read_text())
            _print(_check(client.post("/v1/batches", json=request)))
        elif args.action == "get":
            _print(_check(client.get(f"/v1/batches/{args.id}")))
    return 0


def build_client_parsers(sub) -> None:
    t = sub.add_parser("trainings", help="client: fine-tunes on the server")
    ts = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = ts.add_parser("create", help="upload images and start a training")
    c.add_argument("--images", required=True, help="folder of 2-20 PNG/JPEG/WebP images")
    c.add_argument("--prompt", required=True, help='instance prompt, e.g. "a photo of sks dog"')
    c.add_argument("--params", help='JSON, e.g. \'{"steps": 500, "a1": 64, "a2": 8}\'')
    c.add_argument("--name")
    c.add_argument("--webhook-url")
    c.add_argument("--idempotency-key")
    c.add_argument("--wait", action="store_true", help="follow progress until it ends")
    for name in ("get", "cancel", "wait"):
        p = ts.add_parser(name, help=f"{name} one training")
        p.add_argument("id")
    lst = ts.add_parser("list", help="list trainings, newest first")
    lst.add_argument("--status")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--cursor")
    for parser in ts.choices.values():
        add_client_arguments(parser)

    a = sub.add_parser("adapters", help="client: trained or uploaded adapters")
    as_ = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    lst = as_.add_parser("list")
    lst.add_argument("--limit", type=int, default=20)
    for name in ("get", "delete"):
        as_.add_parser(name).add_argument("id")
    d = as_.add_parser("download", help="download the file")
    d.add_argument("id")
    d.add_argument("--format", default="krona", choices=["krona", "lycoris"])
    d.add_argument("--out")
    u = as_.add_parser("upload", help="upload a native or LyCORIS LoKr file")
    u.add_argument("file")
    u.add_argument("--name")
    u.add_argument("--base-model")
    for parser in as_.choices.values():
        add_client_arguments(parser)

    g = sub.add_parser("generations", help="client: image requests")
    gs = g.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = gs.add_parser("create", help="ask for images")
    c.add_argument("--prompt", required=True)
    c.add_argument("--adapter-id")
    c.add_argument("--adapter-scale", type=float)
    c.add_argument("--negative-prompt")
    c.add_argument("--num-images", type=int, default=1)
    c.add_argument("--steps", type=int, default=25)
    c.add_argument("--guidance-scale", type=float)
    c.add_argument("--width", type=int)
    c.add_argument("--height", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--idempotency-key")
    c.add_argument("--wait", action="store_true")
    c.add_argument("--out", help="folder to save the PNGs in (implies --wait)")
    gs.add_parser("get").add_argument("id")
    d = gs.add_parser("download")
    d.add_argument("id")
    d.add_argument("--out", default=".")
    for parser in gs.choices.values():
        add_client_arguments(parser)

    b = sub.add_parser("batches", help="client: many generations at once")
    bs = b.add_subparsers(dest="action", required=True, metavar="ACTION")
    bs.add_parser("create", help='from a JSON file {"generations": [...]}').add_argument("file")
    bs.add_parser("get").add_argument("id")
    for parser in bs.choices.values():
        add_client_arguments(parser)

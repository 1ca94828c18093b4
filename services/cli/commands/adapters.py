"""`krona adapters …`: trained or uploaded adapters (GET/POST/DELETE /v1/adapters, file, evaluations)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.cli.commands import Resource, api_command, note
from services.cli.connection import CliError, WaitInterrupted, connect
from services.cli.images import expand_images
from services.cli.output import emit, output_format

ADAPTERS = Resource("adapters", "adapter", "ADAPTER_ID", "adp_")


def register(sub) -> None:
    """trained or uploaded adapters: list, download, upload, evaluate, delete

    Adapters of this tenant: made by trainings or uploaded (native Krona or kohya/LyCORIS LoKr files).
    """
    actions = ADAPTERS.group(sub, register)

    ADAPTERS.listing(
        actions,
        "adapters, newest first",
        ["krona adapters list", "ADAPTER=$(krona adapters list --limit 1 -o id)   # the newest adapter's id"],
    )
    ADAPTERS.command(actions, "get", ADAPTERS.show, help="one adapter: factor shapes, parameters, size, evaluation")

    _register_file_commands(actions)


def _register_file_commands(actions) -> None:
    download = ADAPTERS.command(actions, "download", download_adapter, output=False)
    download.add_argument(
        "--format",
        default="krona",
        choices=("krona", "lycoris"),
        help="krona (native A/B factors) or lycoris (kohya LoKr keys that ComfyUI, A1111 and Forge load)",
    )
    download.add_argument(
        "--out", metavar="PATH", help="file or folder to write (default: <id>.<format>.safetensors here)"
    )

    upload = api_command(actions, "upload", upload_adapter)
    upload.add_argument("file", metavar="FILE", help="a .safetensors file whose factors fit the server's base model")
    upload.add_argument("--name", help="a label for people")
    upload.add_argument("--base-model", metavar="NAME", help="the base model it was trained on (must be the server's)")

    ADAPTERS.ending(actions, "delete", "delete an adapter and its file", "deleted adapter {id} and its file")

    _register_evaluate(actions)


def _register_evaluate(actions) -> None:
    evaluate = ADAPTERS.command(actions, "evaluate", evaluate_adapter)
    evaluate.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="PATH",
        help="1-20 photos of the subject: a folder, files or a glob",
    )
    evaluate.add_argument("--prompts", type=int, metavar="N", help="evaluation prompts, 1-25 (server default 4)")
    evaluate.add_argument("--per-prompt", type=int, metavar="N", help="images per prompt, 1-4 (server default 2)")
    evaluate.add_argument("--steps", type=int, metavar="N", help="denoising steps per image (server default 25)")
    evaluate.add_argument(
        "--class-noun", metavar="WORD", help="the subject's class, e.g. dog (default: from the instance prompt)"
    )
    evaluate.add_argument("--identifier", metavar="WORD", help="the rare token, e.g. sks (default: from the prompt)")
    evaluate.add_argument("--wait", action="store_true", help="poll until the scores are in")


def download_adapter(args: argparse.Namespace) -> int:
    """download the adapter file

    Examples:
        krona adapters download adp_… --out sks.safetensors
        krona adapters download adp_… --format lycoris --out sks-lokr.safetensors   # for ComfyUI, A1111, Forge
    """
    target = Path(args.out or ".")
    with connect(args) as client:
        path = client.adapters.download(args.id, format=args.format, path=target)
    note(f"wrote {path} ({path.stat().st_size:,} bytes, {args.format})")
    return 0


def upload_adapter(args: argparse.Namespace) -> int:
    """upload a native Krona or LyCORIS LoKr file trained elsewhere

    Examples:
        krona adapters upload my-lokr.safetensors --name mine
    """
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    with connect(args) as client:
        adapter = client.adapters.upload(path, name=args.name, base_model=args.base_model)
    note(f"uploaded {path} as adapter {adapter.id}")
    emit(adapter, output_format(args), "adapter")
    return 0


def evaluate_adapter(args: argparse.Namespace) -> int:
    """score an adapter (CLIP-I, CLIP-T, DINO) against photos of its subject

    Queue an evaluation on the server: a worker generates the first N of DreamBooth's evaluation prompts for the class
    and scores the images against the photos (CLIP-I, DINO) and the prompts (CLIP-T). The photos are deleted afterwards.
    See the scores with `krona adapters get`.

    Examples:
        krona adapters evaluate adp_… --images photos/ --class-noun dog --wait
        krona adapters evaluate adp_… --images photos/ --prompts 8 --per-prompt 2
    """
    files = expand_images(args.images)
    fields = ("prompts", "per_prompt", "steps", "class_noun", "identifier")
    params = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    with connect(args) as client:
        adapter = client.adapters.evaluate(args.id, files, params=json.dumps(params) if params else None)
        note(f"evaluation of {adapter.id} queued ({len(files)} photos)")
        if args.wait:
            try:
                adapter = client.adapters.wait_evaluation(args.id)
            except KeyboardInterrupt:
                raise WaitInterrupted(
                    f"stopped waiting; the evaluation goes on. See its scores: krona adapters get {args.id}"
                ) from None
    emit(adapter, output_format(args), "adapter")
    evaluation = adapter.evaluation
    return 1 if args.wait and evaluation is not None and evaluation.status == "failed" else 0

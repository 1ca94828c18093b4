"""`krona generations …`: image requests (POST/GET/DELETE /v1/generations, cancel, images)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from services.cli.commands import add_group, add_leaf, add_list_options, list_resources, note
from services.cli.connection import add_connection_options, connect
from services.cli.output import add_output_option, emit, output_format
from services.cli.progress import exit_status, require_done, summary
from services.cli.progress import wait_generation as follow

# The fields of a generation request, as options (the API's names).
FIELDS = ("adapter_id", "adapter_scale", "negative_prompt", "num_images", "steps", "guidance_scale", "width",
          "height", "seed", "webhook_url")  # fmt: skip


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The API's generation fields; unset ones take the server's defaults."""
    group = parser.add_argument_group("generation (the API's fields; unset: the server's defaults)")
    group.add_argument("--adapter-id", metavar="ID", help="adp_… to apply (default: the base model alone)")
    group.add_argument("--adapter-scale", type=float, metavar="S", help="strength of the adapter, 0-2 (server: 1)")
    group.add_argument("--negative-prompt", metavar="TEXT", help="what the images should not show")
    group.add_argument("--num-images", type=int, metavar="N", help="images, 1-8 (server: 1)")
    group.add_argument("--steps", type=int, metavar="N", help="denoising steps, 1-150 (server: 25)")
    group.add_argument("--guidance-scale", type=float, metavar="G", help="classifier-free guidance (server: 7.5)")
    group.add_argument("--width", type=int, metavar="PX", help="multiple of 8 (server: the model's native size)")
    group.add_argument("--height", type=int, metavar="PX", help="multiple of 8 (server: the model's native size)")
    group.add_argument("--seed", type=int, metavar="N", help="for the same images again (server: a random one)")
    group.add_argument("--webhook-url", metavar="URL", help="POSTed to when the generation ends (signed)")


def generation_fields(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def register(sub) -> None:
    _, actions = add_group(
        sub, "generations", "ask for images, with or without an adapter", "Image requests: create, follow, download."
    )

    create = add_leaf(
        actions,
        "create",
        "ask for images (with --out: wait and save them)",
        [
            'krona generations create --prompt "sks toy on the moon" --adapter-id adp_… --wait --out images/',
            'krona generations create --prompt "a red car" --num-images 4 --steps 30 --seed 7',
        ],
    )
    create.add_argument("--prompt", required=True, help="what to draw")
    add_generation_options(create)
    create.add_argument("--idempotency-key", metavar="KEY", help="the same key returns the first generation")
    create.add_argument("--wait", action="store_true", help="follow it until it ends (Ctrl-C stops waiting only)")
    create.add_argument("--out", metavar="DIR", help="save the PNGs in DIR as <id>-<index>.png (implies --wait)")
    create.set_defaults(handler=create_generation)

    get = add_leaf(actions, "get", "one generation with its image URLs", ["krona generations get gen_…"])
    get.add_argument("id", metavar="GENERATION_ID", help="gen_…")
    get.set_defaults(handler=get_generation)

    listing = add_leaf(
        actions,
        "list",
        "generations, newest first",
        ["krona generations list", "krona generations list --batch-id bat_… --status failed"],
    )
    add_list_options(listing, statuses=True)
    listing.add_argument("--adapter-id", metavar="ID", help="only those with this adapter")
    listing.add_argument("--batch-id", metavar="ID", help="only those of this batch")
    listing.set_defaults(handler=list_generations)

    wait = add_leaf(
        actions, "wait", "follow a generation until it ends", ["krona generations wait gen_… --out images/"]
    )
    wait.add_argument("id", metavar="GENERATION_ID", help="gen_…")
    wait.add_argument("--out", metavar="DIR", help="then save the PNGs in DIR")
    wait.set_defaults(handler=wait_generation)

    cancel = add_leaf(actions, "cancel", "stop a queued or running generation", ["krona generations cancel gen_…"])
    cancel.add_argument("id", metavar="GENERATION_ID", help="gen_…")
    cancel.set_defaults(handler=cancel_generation)

    delete = add_leaf(
        actions, "delete", "delete an ended generation and its images", ["krona generations delete gen_…"]
    )
    delete.add_argument("id", metavar="GENERATION_ID", help="gen_…")
    delete.set_defaults(handler=delete_generation)

    download = add_leaf(
        actions,
        "download",
        "save a generation's images as PNG files",
        ["krona generations download gen_… --out images/"],
    )
    download.add_argument("id", metavar="GENERATION_ID", help="gen_…")
    download.add_argument("--out", default=".", metavar="DIR", help="folder for <id>-<index>.png")
    download.set_defaults(handler=download_generation)

    for parser in actions.choices.values():
        add_connection_options(parser)
        if parser not in (delete, download):
            add_output_option(parser)


def save_images(client, generation, out: str) -> list[Path]:
    paths = client.generations.download(generation.id, out)
    for path in paths:
        note(f"wrote {path}")
    return paths


def _finish(client, generation, started: float, out: str | None, args: argparse.Namespace) -> int:
    note(summary("generation", generation, started))
    if out and generation.status == "succeeded":
        save_images(client, generation, out)
    emit(generation, output_format(args), "generation")
    return exit_status(generation)


def create_generation(args: argparse.Namespace) -> int:
    with connect(args) as client:
        generation = client.generations.create(
            args.prompt, idempotency_key=args.idempotency_key, **generation_fields(args)
        )
        note(f"generation {generation.id} {generation.status}")
        if not (args.wait or args.out):
            note(f"follow it: krona generations wait {generation.id} --out DIR")
            emit(generation, output_format(args), "generation")
            return 0
        started = time.monotonic()
        generation = follow(client, generation.id)
        return _finish(client, generation, started, args.out, args)


def get_generation(args: argparse.Namespace) -> int:
    with connect(args) as client:
        emit(client.generations.get(args.id), output_format(args), "generation")
    return 0


def list_generations(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = list_resources(
            lambda **k: client.generations.list_page(
                status=args.status, adapter_id=args.adapter_id, batch_id=args.batch_id, **k
            ),
            args,
        )
    emit(page, output_format(args), "generation", page=True)
    return 0


def wait_generation(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with connect(args) as client:
        generation = follow(client, args.id)
        return _finish(client, generation, started, args.out, args)


def cancel_generation(args: argparse.Namespace) -> int:
    with connect(args) as client:
        generation = client.generations.cancel(args.id)
    note(f"generation {generation.id} {generation.status}")
    emit(generation, output_format(args), "generation")
    return 0


def delete_generation(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.generations.delete(args.id)
    note(f"deleted generation {args.id} and its images")
    return 0


def download_generation(args: argparse.Namespace) -> int:
    with connect(args) as client:
        generation = client.generations.get(args.id)
        require_done(generation, "generation")
        save_images(client, generation, args.out)
    return 0

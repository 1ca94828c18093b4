"""`krona generations …`: image requests (POST/GET/DELETE /v1/generations, cancel, images)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from services.cli.commands import Finish, Handler, Resource, api_command, note
from services.cli.connection import connect
from services.cli.output import emit, output_format
from services.cli.progress import exit_status, require_done, summary, wait_generation

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


GENERATIONS = Resource("generations", "generation", "GENERATION_ID", "gen_", follow=wait_generation)


def register(sub) -> None:
    """ask for images, with or without an adapter

    Image requests: create, follow, download.
    """
    actions = GENERATIONS.group(sub, register)

    create = api_command(actions, "create", create_generation)
    create.add_argument("--prompt", required=True, help="what to draw")
    add_generation_options(create)
    create.add_argument("--idempotency-key", metavar="KEY", help="the same key returns the first generation")
    create.add_argument("--wait", action="store_true", help="follow it until it ends (Ctrl-C stops waiting only)")
    create.add_argument("--out", metavar="DIR", help="save the PNGs in DIR as <id>-<index>.png (implies --wait)")

    GENERATIONS.command(actions, "get", GENERATIONS.show, help="one generation with its image URLs")

    listing = GENERATIONS.listing(
        actions,
        "generations, newest first",
        ["krona generations list", "krona generations list --batch-id bat_… --status failed"],
        "status",
        "adapter_id",
        "batch_id",
    )
    listing.add_argument("--adapter-id", metavar="ID", help="only those with this adapter")
    listing.add_argument("--batch-id", metavar="ID", help="only those of this batch")

    add_image_job_commands(
        GENERATIONS,
        actions,
        finish,
        download_generation,
        cancel=(
            "stop a queued or running generation",
            lambda generation: f"generation {generation.id} {generation.status}",
        ),
        download_help="save a generation's images as PNG files",
        files="<id>-<index>.png",
    )
    GENERATIONS.ending(
        actions, "delete", "delete an ended generation and its images", "deleted generation {id} and its images"
    )


def add_image_job_commands(
    job: Resource,
    actions,
    finish: Finish,
    download: Handler,
    *,
    cancel: tuple[str, Callable],
    download_help: str,
    files: str,
) -> None:
    """``wait`` (``--out``: then save the images), ``cancel`` and ``download`` of a job that makes images: a
    generation or a batch. ``cancel`` is its help and what it says of the job it stopped."""
    wait = job.command(
        actions,
        "wait",
        job.follower(finish),
        help=f"follow a {job.kind} until it ends",
        examples=[f"krona {job.collection} wait {job.prefix}… --out images/"],
    )
    wait.add_argument("--out", metavar="DIR", help=f"then save the images in DIR as {files}")
    job.command(actions, "cancel", job.acting("cancel", cancel[1]), help=cancel[0])
    command = job.command(
        actions,
        "download",
        download,
        help=download_help,
        examples=[f"krona {job.collection} download {job.prefix}… --out images/"],
        output=False,
    )
    command.add_argument("--out", default=".", metavar="DIR", help=f"folder for {files}")


def save_images(client, generation, out: str) -> list[Path]:
    paths = client.generations.download(generation.id, out)
    for path in paths:
        note(f"wrote {path}")
    return paths


def finish(client, generation, started: float, args: argparse.Namespace) -> int:
    note(summary("generation", generation, started))
    if args.out and generation.status == "succeeded":
        save_images(client, generation, args.out)
    emit(generation, output_format(args), "generation")
    return exit_status(generation)


def create_generation(args: argparse.Namespace) -> int:
    """ask for images (with --out: wait and save them)

    Examples:
        krona generations create --prompt "sks toy on the moon" --adapter-id adp_… --wait --out images/
        krona generations create --prompt "a red car" --num-images 4 --steps 30 --seed 7
    """
    with connect(args) as client:
        generation = client.generations.create(
            args.prompt, idempotency_key=args.idempotency_key, **generation_fields(args)
        )
        note(f"generation {generation.id} {generation.status}")
        return GENERATIONS.queued(args, client, generation, finish, wait=args.wait or args.out, hint=" --out DIR")


def download_generation(args: argparse.Namespace) -> int:
    with connect(args) as client:
        generation = client.generations.get(args.id)
        require_done(generation, "generation")
        save_images(client, generation, args.out)
    return 0

"""`krona batches …`: many generations in one request (POST/GET /v1/batches, cancel)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from services.cli.commands import Resource, api_command, note
from services.cli.commands.generations import add_generation_options, add_image_job_commands, generation_fields
from services.cli.connection import CliError, connect
from services.cli.output import emit, output_format
from services.cli.progress import duration, wait_batch

BATCHES = Resource("batches", "batch", "BATCH_ID", "bat_", follow=wait_batch)


def register(sub) -> None:
    """many generations in one request (up to 1000)

    Batches of generations: create, follow.
    """
    actions = BATCHES.group(sub, register)

    create = api_command(actions, "create", create_batch)
    create.add_argument("file", nargs="?", metavar="FILE", help="JSON file of the requests, - for stdin")
    create.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="a generation of this prompt (repeat it; the options below apply to each)",
    )
    add_generation_options(create)
    create.add_argument("--idempotency-key", metavar="KEY", help="the same key returns the first batch")
    create.add_argument("--wait", action="store_true", help="follow it until every generation has ended")
    create.add_argument("--out", metavar="DIR", help="save every image in DIR as <generation id>-<index>.png (waits)")

    BATCHES.command(actions, "get", BATCHES.show, help="a batch with its counts per status")
    BATCHES.listing(actions, "batches, newest first", ["krona batches list"])
    add_image_job_commands(
        BATCHES,
        actions,
        finish,
        download_batch,
        cancel=(
            "stop the batch's queued and running generations",
            lambda batch: f"batch {batch.id}: its queued and running generations stop",
        ),
        download_help="save every image of a batch",
        files="<generation id>-<index>.png",
    )


def _requests(args: argparse.Namespace) -> list[dict]:
    if args.file and args.prompts:
        raise CliError("give a FILE or --prompt, not both")
    if args.prompts:
        return [{"prompt": prompt, **generation_fields(args)} for prompt in args.prompts]
    if not args.file:
        raise CliError('give a JSON file of {"generations": [...]} (or - for stdin), or --prompt TEXT (repeatable)')
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{args.file} is not JSON ({exc.msg}, line {exc.lineno})") from None
    requests = body.get("generations") if isinstance(body, dict) else body
    if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
        raise CliError(f'{args.file}: expected {{"generations": [{{"prompt": …}}, …]}} or a list of such objects')
    extra = generation_fields(args)
    return [{**extra, **request} for request in requests]


def download_all(client, batch, out: str) -> int:
    """Every image of the batch's succeeded generations into ``out``; the number of files."""
    written = 0
    for generation in client.generations.list(batch_id=batch.id, status="succeeded", limit=100):
        written += len(client.generations.download(generation.id, out))
    note(f"wrote {written} images to {out}")
    return written


def finish(client, batch, started: float, args: argparse.Namespace) -> int:
    counts = ", ".join(f"{n} {s}" for s, n in batch.counts.items() if n)
    note(f"batch {batch.id} ended after {duration(time.monotonic() - started)}: {counts or 'empty'}")
    if args.out:
        download_all(client, batch, args.out)
    emit(batch, output_format(args), "batch")
    return 0 if batch.counts.get("failed", 0) == 0 and batch.counts.get("canceled", 0) == 0 else 1


def create_batch(args: argparse.Namespace) -> int:
    """queue many generations at once

    Queue up to 1000 generations: from a JSON file ({"generations": [{"prompt": …}, …]}, or just the list; - reads
    stdin), or one per --prompt with the same options. With --out, waits and downloads every image to DIR.

    Examples:
        krona batches create requests.json --wait --out images/   # {"generations": [{"prompt": …}, …]}
        krona batches create --prompt "a red car" --prompt "a blue car" --steps 20 --wait --out images/
        jq -c '{generations: [.[] | {prompt: .}]}' prompts.json | krona batches create -
    """
    requests = _requests(args)
    with connect(args) as client:
        batch = client.batches.create(requests, idempotency_key=args.idempotency_key)
        note(f"batch {batch.id} queued: {batch.total} generations")
        return BATCHES.queued(args, client, batch, finish, wait=args.wait or args.out, hint=" --out DIR")


def download_batch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        download_all(client, client.batches.get(args.id), args.out)
    return 0

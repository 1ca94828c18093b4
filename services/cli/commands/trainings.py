"""`krona trainings …`: fine-tunes on the server (POST/GET /v1/trainings, cancel, delete, events)."""

from __future__ import annotations

import argparse
import json
import time

from services.cli.commands import add_group, add_leaf, add_list_options, list_resources, note
from services.cli.connection import WaitInterrupted, add_connection_options, connect
from services.cli.images import expand_images
from services.cli.output import add_output_option, emit, output_format
from services.cli.params import add_training_options, training_params
from services.cli.progress import exit_status, summary
from services.cli.progress import wait_training as follow

PROMPT = '"a photo of sks toy"'


def register(sub) -> None:
    _, actions = add_group(
        sub,
        "trainings",
        "fine-tune an adapter on photos of a subject, on the server",
        "Fine-tunes on the server: start one on 2-20 photos, follow it, list, cancel or delete them.",
    )

    create = add_leaf(
        actions,
        "create",
        "upload 2-20 photos and start a training",
        [
            f"krona trainings create --images photos/ --prompt {PROMPT} --steps 60 --wait",
            f"krona trainings create --images 'photos/*.jpg' --prompt {PROMPT} --learning-rate 6e-4 --evaluate",
            f"krona trainings create --images a.png b.png c.png --prompt {PROMPT} --params '{{\"steps\": 200}}'",
        ],
        description="Upload 2-20 photos of one subject (PNG, JPEG or WebP) and start a DreamBooth-KronA fine-tune. "
        "Parameters the options do not set take the server's defaults (the paper's: 500 steps on SD 1.x/2.x, "
        "learning rate 1e-3, a1=64, a2=8). With --wait, follows it to the end: exit status 0 when it succeeded.",
    )
    create.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="PATH",
        help="the photos: a folder, files, or a glob pattern (quoted: 'photos/*.jpg')",
    )
    create.add_argument(
        "--prompt", "--instance-prompt", dest="prompt", required=True, help=f"instance prompt, e.g. {PROMPT}"
    )
    create.add_argument("--name", help="a label for people")
    create.add_argument("--params", metavar="JSON", help="more parameters as JSON, e.g. '{\"steps\": 200}'")
    create.add_argument("--webhook-url", metavar="URL", help="POSTed to when the training ends (signed)")
    create.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="the same key returns the first training instead of starting another (default: a new one per command)",
    )
    create.add_argument("--wait", action="store_true", help="follow it until it ends (Ctrl-C stops waiting only)")
    add_training_options(create, local=False)
    create.set_defaults(handler=create_training)

    get = add_leaf(actions, "get", "one training with its progress", ["krona trainings get trn_…"])
    get.add_argument("id", metavar="TRAINING_ID", help="trn_…")
    get.set_defaults(handler=get_training)

    listing = add_leaf(
        actions,
        "list",
        "trainings, newest first",
        ["krona trainings list", "krona trainings list --status running", "krona trainings list --all -o json"],
    )
    add_list_options(listing, statuses=True)
    listing.set_defaults(handler=list_trainings)

    wait = add_leaf(
        actions,
        "wait",
        "follow a training until it ends",
        ["krona trainings wait trn_…"],
        description="Follow a training until it ends, with its phase and the server's ETA on stderr; the exit status "
        "is 0 when it succeeded. Ctrl-C stops waiting; the training goes on.",
    )
    wait.add_argument("id", metavar="TRAINING_ID", help="trn_…")
    wait.set_defaults(handler=wait_training)

    cancel = add_leaf(
        actions,
        "cancel",
        "stop a training (a queued one at once, a running one at its next step)",
        ["krona trainings cancel trn_…"],
    )
    cancel.add_argument("id", metavar="TRAINING_ID", help="trn_…")
    cancel.set_defaults(handler=cancel_training)

    delete = add_leaf(
        actions,
        "delete",
        "delete an ended training with its photos (its adapter stays)",
        ["krona trainings delete trn_…"],
    )
    delete.add_argument("id", metavar="TRAINING_ID", help="trn_…")
    delete.set_defaults(handler=delete_training)

    events = add_leaf(
        actions,
        "events",
        "print a training's progress events as they come (JSON lines)",
        ["krona trainings events trn_… | jq -c '.data.progress'"],
    )
    events.add_argument("id", metavar="TRAINING_ID", help="trn_…")
    events.set_defaults(handler=training_events)

    for parser in actions.choices.values():
        add_connection_options(parser)
        if parser is not events and parser is not delete:
            add_output_option(parser)


def create_training(args: argparse.Namespace) -> int:
    files = expand_images(args.images)
    params = training_params(args, args.params)
    with connect(args) as client:
        training = client.trainings.create(
            images=files,
            instance_prompt=args.prompt,
            params=params or None,
            name=args.name,
            webhook_url=args.webhook_url,
            idempotency_key=args.idempotency_key,
        )
        steps = training.progress.total_steps or params.get("steps") or "the default number of"
        note(f"training {training.id} {training.status}: {len(files)} images, {steps} steps")
        if not args.wait:
            note(f"follow it: krona trainings wait {training.id}")
            emit(training, output_format(args), "training")
            return 0
        started = time.monotonic()
        training = follow(client, training.id)
    adapter = f"; adapter {training.adapter_id}" if training.adapter_id else ""
    note(summary("training", training, started) + adapter)
    emit(training, output_format(args), "training")
    return exit_status(training)


def get_training(args: argparse.Namespace) -> int:
    with connect(args) as client:
        emit(client.trainings.get(args.id), output_format(args), "training")
    return 0


def list_trainings(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = list_resources(lambda **k: client.trainings.list_page(status=args.status, **k), args)
    emit(page, output_format(args), "training", page=True)
    return 0


def wait_training(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with connect(args) as client:
        training = follow(client, args.id)
    adapter = f"; adapter {training.adapter_id}" if training.adapter_id else ""
    note(summary("training", training, started) + adapter)
    emit(training, output_format(args), "training")
    return exit_status(training)


def cancel_training(args: argparse.Namespace) -> int:
    with connect(args) as client:
        training = client.trainings.cancel(args.id)
    when = "canceled" if training.status == "canceled" else "stops at its next step"
    note(f"training {training.id} {when}")
    emit(training, output_format(args), "training")
    return 0


def delete_training(args: argparse.Namespace) -> int:
    with connect(args) as client:
        client.trainings.delete(args.id)
    note(f"deleted training {args.id} and its photos (its adapter stays)")
    return 0


def training_events(args: argparse.Namespace) -> int:
    with connect(args) as client:
        try:
            for event in client.trainings.events(args.id):
                data = event.training.model_dump(mode="json")
                print(json.dumps({"event": event.event, "data": data}), flush=True)
        except KeyboardInterrupt:
            raise WaitInterrupted(
                f"stopped; the training goes on. Follow it again: krona trainings events {args.id}"
            ) from None
    return 0

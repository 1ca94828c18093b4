"""`krona trainings …`: fine-tunes on the server (POST/GET /v1/trainings, cancel, delete, events)."""

from __future__ import annotations

import argparse
import json

from services.cli.commands import Resource, api_command, note
from services.cli.connection import WaitInterrupted, connect
from services.cli.images import expand_images
from services.cli.output import emit, output_format
from services.cli.params import add_training_options, training_params
from services.cli.progress import exit_status, summary, wait_training

PROMPT = '"a photo of sks toy"'
TRAININGS = Resource("trainings", "training", "TRAINING_ID", "trn_", follow=wait_training)


def register(sub) -> None:
    """fine-tune an adapter on photos of a subject, on the server

    Fine-tunes on the server: start one on 2-20 photos, follow it, list, cancel or delete them.
    """
    actions = TRAININGS.group(sub, register)

    create = api_command(actions, "create", create_training)
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

    _register_follow_commands(actions)


def _register_follow_commands(actions) -> None:
    TRAININGS.command(actions, "get", TRAININGS.show, help="one training with its progress")
    TRAININGS.listing(
        actions,
        "trainings, newest first",
        ["krona trainings list", "krona trainings list --status running", "krona trainings list --all -o json"],
        "status",
    )
    TRAININGS.command(
        actions,
        "wait",
        TRAININGS.follower(finish),
        help="follow a training until it ends",
        description="Follow a training until it ends, with its phase and the server's ETA on stderr; the exit status "
        "is 0 when it succeeded. Ctrl-C stops waiting; the training goes on.",
    )
    TRAININGS.command(
        actions,
        "cancel",
        TRAININGS.acting("cancel", _canceled),
        help="stop a training (a queued one at once, a running one at its next step)",
    )
    TRAININGS.ending(
        actions,
        "delete",
        "delete an ended training with its photos (its adapter stays)",
        "deleted training {id} and its photos (its adapter stays)",
    )
    TRAININGS.command(actions, "events", training_events, output=False)


def finish(client, training, started: float, args: argparse.Namespace) -> int:
    adapter = f"; adapter {training.adapter_id}" if training.adapter_id else ""
    note(summary("training", training, started) + adapter)
    emit(training, output_format(args), "training")
    return exit_status(training)


def create_training(args: argparse.Namespace) -> int:
    """upload 2-20 photos and start a training

    Upload 2-20 photos of one subject (PNG, JPEG or WebP) and start a DreamBooth-KronA fine-tune. Parameters the options
    do not set take the server's defaults (the paper's: 500 steps on SD 1.x/2.x, learning rate 1e-3, a1=64, a2=8). With
    --wait, follows it to the end: exit status 0 when it succeeded.

    Examples:
        krona trainings create --images photos/ --prompt "a photo of sks toy" --steps 60 --wait
        krona trainings create --images 'photos/*.jpg' --prompt "a photo of sks toy" --learning-rate 6e-4 --evaluate
        krona trainings create --images a.png b.png c.png --prompt "a photo of sks toy" --params '{"steps": 200}'
    """
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
        return TRAININGS.queued(args, client, training, finish, wait=args.wait)


def _canceled(training) -> str:
    return f"training {training.id} {'canceled' if training.status == 'canceled' else 'stops at its next step'}"


def training_events(args: argparse.Namespace) -> int:
    """print a training's progress events as they come (JSON lines)

    Examples:
        krona trainings events trn_… | jq -c '.data.progress'
    """
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

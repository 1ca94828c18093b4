"""`krona up`, `krona demo`, `krona gateway`, `krona worker`, `krona migrate`: running the service (handlers in
services/cli/stack.py and services/cli/demo_service.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from services.cli import stack
from services.cli.commands import add_leaf


def register(sub) -> None:
    up = add_leaf(sub, "up", run_up)
    _listen(up)
    up.add_argument(
        "--data-dir", default=".krona", metavar="DIR", help="database, broker, files, logs and the api-key file"
    )

    demo = add_leaf(sub, "demo", run_demo)
    demo.add_argument("--out", default="out/demo", metavar="DIR", help="folder for the demo's files")
    demo.add_argument("--local", action="store_true", help="the adapter-only demo in this process (no service)")
    demo.add_argument("--base", default="tiny-sd", help="with --local: tiny-sd, tiny-sdxl, a folder or a hub id")

    _register_processes(sub)


def _register_processes(sub) -> None:
    migrate = add_leaf(sub, "migrate", run_migrate)
    _data_dir(migrate)

    gateway = add_leaf(sub, "gateway", run_gateway)
    _listen(gateway)
    gateway.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gateway processes (default: KRONA_GATEWAY_WORKERS, 1); each has its own threadpool",
    )
    gateway.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # one of --workers N
    _data_dir(gateway)

    worker = add_leaf(sub, "worker", run_worker)
    worker.add_argument(
        "--queues",
        default="train,infer",
        help="train, infer, both (train,infer), or webhooks (deliveries only, KRONA_WEBHOOK_CONCURRENCY at once)",
    )
    _data_dir(worker)


def _listen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR", help="embedded data folder (default: $KRONA_DATA_DIR, else .krona)"
    )


def run_up(args: argparse.Namespace) -> int:
    """run the service on this machine: gateway + workers, SQLite, local files, tiny-sd

    Run the embedded service: the HTTP gateway, a job worker and a webhook worker, with SQLite, a local blob folder and
    the built-in tiny-sd model (set KRONA_BASE_MODEL for a real one). Says it is up once /readyz answers; keeps access
    logs in <data dir>/logs/ (warnings and errors also here). One `krona up` per data folder. Ctrl-C stops it: a running
    training checkpoints first (Ctrl-C again stops at once).

    Examples:
        krona up
        krona up --port 8080 --data-dir /srv/krona
    """
    return stack.up(args)


def run_migrate(args: argparse.Namespace) -> int:
    """bring the database to the schema head and create the S3 bucket if it is missing

    Bring the database (KRONA_DATABASE_URL, or the embedded one under --data-dir) to the schema head, and create the S3
    bucket (KRONA_S3_BUCKET) if it is missing. Run it once per release.

    Examples:
        krona migrate
        KRONA_DATABASE_URL=postgresql+psycopg://krona@db/krona krona migrate
    """
    return stack.migrate(args)


def run_gateway(args: argparse.Namespace) -> int:
    """run the HTTP gateway alone (production: behind a proxy)

    Examples:
        krona gateway --host 0.0.0.0 --workers 2
    """
    return stack.gateway(args)


def run_worker(args: argparse.Namespace) -> int:
    """run a Celery worker for the given queues: train/infer one job at a time, webhooks on a thread pool

    Examples:
        krona worker --queues train
        krona worker --queues webhooks
    """
    return stack.worker(args)


def run_demo(args: argparse.Namespace) -> int:
    """the service end to end on the embedded stack and tiny-sd (no servers, no GPU)

    Start `krona up` in a fresh folder, train an adapter on three sample photos over HTTP, generate two images with it,
    download it in both formats and stop. The tiny model has random weights: the images are noise. --local runs the
    adapter alone in this process instead.

    Examples:
        krona demo
        krona demo --local --base tiny-sdxl
    """
    start = time.perf_counter()
    if args.local:
        # lazy: loads torch, PIL, numpy, …
        from services.cli.demo import run_demo as local_demo

        local_demo(Path(args.out), args.base)
    else:
        # lazy: loads httpx
        from services.cli.demo_service import run_service_demo

        run_service_demo(Path(args.out))
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0

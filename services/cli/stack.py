"""`krona up`, `krona migrate`, `krona admin create-tenant|rotate-webhook-secret`, `krona gateway`, `krona worker`.

`krona up` is the embedded default of DESIGN.md: SQLite, a local blob folder, Celery over kombu's
SQLAlchemy transport on SQLite, the tiny-sd model, with three child processes: the gateway, a job
worker (train and infer) and a webhook worker. The same commands with KRONA_DATABASE_URL /
KRONA_BROKER_URL / KRONA_S3_* set run against PostgreSQL, Redis and S3.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.cli.supervisor import Child, Supervisor

DEFAULT_TENANT = "default"
# How long `krona up` waits for its job worker to drain when it stops (one training step and a checkpoint).
WORKER_STOP_SECONDS = 120.0


def _settings(data_dir: str | None = None, *, export: bool = False):
    """Settings with ``--data-dir`` applied; ``export`` also puts it in the environment for child processes."""
    from shared.settings import Settings

    if not data_dir:
        return Settings()
    resolved = str(Path(data_dir).resolve())
    if export:
        os.environ["KRONA_DATA_DIR"] = resolved
    return Settings(data_dir=resolved)


def migrate(args: argparse.Namespace) -> int:
    from shared.db import upgrade_to_head

    settings = _settings(getattr(args, "data_dir", None))
    upgrade_to_head(settings.resolved_database_url)
    print(f"database at migration head: {settings.resolved_database_url.split('@')[-1]}")
    _ensure_bucket(settings)
    return 0


def _ensure_bucket(settings) -> None:
    """With S3 storage: create the bucket when it is missing, and say which happened (no-op for a local folder)."""
    from shared.storage import S3Storage, StorageError, storage_from_settings

    storage = storage_from_settings(settings)
    if not isinstance(storage, S3Storage):
        return
    try:
        created = storage.ensure_bucket()
    except StorageError as exc:
        raise ValueError(str(exc)) from exc  # printed as `krona migrate: error: …`
    print(f"S3 bucket {storage.bucket!r} at {storage.endpoint}: {'created' if created else 'exists'}")


def admin(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from shared.db import Tenant, make_engine, make_session_factory
    from shared.tenants import create_tenant, rotate_webhook_secret

    settings = _settings(args.data_dir)
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    with sessions() as session:
        if args.admin_command == "create-tenant":
            tenant, key = create_tenant(session, args.name)
            session.commit()
            print(f"tenant {tenant.name} ({tenant.id}) created; its webhook signing secret (shown once):")
            print(tenant.webhook_secret)
            print("its API key (shown once):")
            print(key)
            return 0
        tenant = session.scalar(select(Tenant).where(Tenant.name == args.name))
        if tenant is None:
            raise ValueError(f"no tenant {args.name!r}")
        secret = rotate_webhook_secret(session, tenant)
        session.commit()
    print(f"tenant {args.name}: new webhook signing secret (shown once; deliveries from now on use it):")
    print(secret)
    return 0


def _ensure_default_tenant(settings) -> Path:
    """First start: create tenant 'default' and write its key to <data_dir>/api-key (mode 600)."""
    from sqlalchemy import select

    from shared.db import Tenant, make_engine, make_session_factory
    from shared.tenants import create_api_key, create_tenant

    key_file = settings.data_dir.resolve() / "api-key"
    secret_file = settings.data_dir.resolve() / "webhook-secret"
    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    with sessions() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == DEFAULT_TENANT))
        if tenant is not None and key_file.is_file():
            return key_file
        if tenant is None:
            tenant, key = create_tenant(session, DEFAULT_TENANT)
        else:  # the key file was removed: issue a new key
            key = create_api_key(session, tenant)
        secret = tenant.webhook_secret
        session.commit()
    _write_private(key_file, key)
    _write_private(secret_file, secret)
    return key_file


def _write_private(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)


def gateway(args: argparse.Namespace) -> int:
    """Serve the gateway. With N > 1 workers: N processes that each bind the port with SO_REUSEPORT (the
    kernel spreads connections), started and restarted by the same supervisor as `krona up`.

    (uvicorn's own --workers hands the listening socket to its children as a socket of protocol 0, so
    asyncio leaves Nagle's algorithm on and every answer waits ~40 ms for a delayed ACK; measured here.)
    """
    settings = _settings(getattr(args, "data_dir", None), export=True)
    workers = args.workers or settings.gateway_workers
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]  # present but empty would write metric files to the cwd
    if workers == 1 or args.reuse_port:
        _serve_gateway(args.host, args.port, reuse_port=args.reuse_port)
        return 0
    import shutil
    import tempfile

    # Several processes: their metrics are summed from files (prometheus_client's multiprocess mode).
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="krona-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [sys.executable, "-m", "services.cli.main", "gateway", "--host", args.host, "--port", str(args.port),
               "--workers", "1", "--reuse-port"]  # fmt: skip
    state_dir = Path(tempfile.mkdtemp(prefix="krona-gateway-"))
    supervisor = Supervisor([Child(f"gateway-{i}", command, env) for i in range(workers)], state_dir)
    supervisor.start()
    try:
        supervisor.run_until_signal()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        if metrics_dir.startswith(tempfile.gettempdir()) and Path(metrics_dir).name.startswith("krona-metrics-"):
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _serve_gateway(host: str, port: int, *, reuse_port: bool) -> None:
    import socket

    import uvicorn

    from services.gateway.app import configure_logging

    configure_logging()
    config = uvicorn.Config(
        "services.gateway.app:create_served_app", factory=True, host=host, port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    if not reuse_port:
        server.run()
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP given explicitly: asyncio sets TCP_NODELAY on accepted connections only when the socket says
    # it is TCP (proto 0, the default, leaves Nagle's algorithm on and adds ~40 ms to every answer).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server.run(sockets=[sock])


def worker_command(queues: str, hostname: str, *, webhook_concurrency: int = 8) -> list[str]:
    """The Celery worker for ``queues``: jobs one at a time (solo pool); webhook deliveries on a thread pool."""
    from shared.queue import WEBHOOK_QUEUE

    names = set(queues.split(","))
    if WEBHOOK_QUEUE in names and names != {WEBHOOK_QUEUE}:
        raise ValueError(f"the {WEBHOOK_QUEUE} queue needs a worker of its own (--queues {WEBHOOK_QUEUE})")
    pool = ["threads", str(webhook_concurrency)] if names == {WEBHOOK_QUEUE} else ["solo", "1"]
    return [
        sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", queues, "--pool", pool[0],
        "--concurrency", pool[1], "--hostname", hostname, "--loglevel", "WARNING", "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip


def worker(args: argparse.Namespace) -> int:
    settings = _settings(getattr(args, "data_dir", None), export=True)
    command = worker_command(
        args.queues, f"krona-{args.queues.replace(',', '-')}@%h", webhook_concurrency=settings.webhook_concurrency
    )
    os.execv(sys.executable, command)
    return 0  # not reached


def up(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from shared.db import upgrade_to_head
    from shared.models import resolve_base_model

    upgrade_to_head(settings.resolved_database_url)
    _ensure_bucket(settings)
    # Build (once) or resolve the base model here, before the children start, so that the first job does not
    # wait for the build (the gateway reads the UNet config either way, without building).
    resolve_base_model(settings.base_model)
    key_file = _ensure_default_tenant(settings)
    env = {**os.environ, "KRONA_DATA_DIR": str(settings.data_dir.resolve())}
    env.setdefault("KRONA_PUBLIC_URL", f"http://{args.host}:{args.port}")
    gateway_cmd = [sys.executable, "-m", "services.cli.main", "gateway", "--host", args.host, "--port", str(args.port)]
    supervisor = Supervisor(
        [
            Child("gateway", gateway_cmd, env),
            # SIGTERM drains the job worker: a training checkpoints and hands over, a batch finishes.
            Child("worker", worker_command("train,infer", "krona-embedded@%h"), env, stop_timeout=WORKER_STOP_SECONDS),
            Child(
                "webhooks",
                worker_command("webhooks", "krona-webhooks@%h", webhook_concurrency=settings.webhook_concurrency),
                env,
            ),
        ],
        settings.data_dir.resolve(),
    )
    supervisor.start()
    print(f"Krona is up at http://{args.host}:{args.port} (data in {settings.data_dir.resolve()})")
    print(f"API key of tenant '{DEFAULT_TENANT}': {key_file.read_text().strip()}  (also in {key_file})")
    print(f"webhook signing secret of tenant '{DEFAULT_TENANT}' is in {key_file.parent / 'webhook-secret'}")
    if settings.base_model.startswith("tiny-"):
        print(f"base model {settings.base_model}: random weights built offline, so images are noise")
    print("Ctrl-C stops it.", flush=True)
    # A child that dies (a crashed worker, an OOM kill) is started again with backoff; the others keep
    # serving. Only Ctrl-C or SIGTERM stops the whole stack.
    supervisor.run_until_signal()
    print("Krona stopped.")
    return 0

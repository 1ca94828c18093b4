"""`krona up`, `krona migrate`, `krona gateway`, `krona worker`.

`krona up` is the embedded mode: SQLite, a local blob folder, Celery over kombu's
SQLAlchemy transport on SQLite, the tiny-sd model, with three child processes: the gateway, a job
worker (train and infer) and a webhook worker. The same commands with KRONA_DATABASE_URL /
KRONA_BROKER_URL / KRONA_S3_* set run against PostgreSQL, Redis and S3.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from services.cli.connection import CliError
from services.cli.supervisor import Child, Supervisor
from shared.models import resolve_base_model
from shared.queue import WEBHOOK_QUEUE
from shared.storage import S3Storage, StorageError, storage_from_settings

DEFAULT_TENANT = "default"
# How long `krona up` waits for its job worker to drain when it stops (one training step and a checkpoint).
WORKER_STOP_SECONDS = 120.0
# The webhook worker's: its deliveries are retried when cut short, so it does not hold up a stop.
WEBHOOKS_STOP_SECONDS = 1.5
# How long the gateway lets requests in flight (and event streams) finish when it stops.
GATEWAY_GRACEFUL_SECONDS = 2


def _settings(data_dir: str | None = None, *, export: bool = False):
    """Settings with ``--data-dir`` applied; ``export`` also puts it in the environment for child processes."""
    # lazy: loads pydantic
    from shared.settings import Settings

    if not data_dir:
        return Settings()
    resolved = str(Path(data_dir).resolve())
    if export:
        os.environ["KRONA_DATA_DIR"] = resolved
    return Settings(data_dir=resolved)


def migrate(args: argparse.Namespace) -> int:
    # lazy: loads sqlalchemy
    from shared.db import upgrade_to_head

    settings = _settings(getattr(args, "data_dir", None))
    upgrade_to_head(settings.resolved_database_url)
    print(f"database at migration head: {settings.resolved_database_url.split('@')[-1]}")
    _ensure_bucket(settings)
    return 0


def _ensure_bucket(settings) -> None:
    """With S3 storage: create the bucket when it is missing, and say which happened (no-op for a local folder)."""

    storage = storage_from_settings(settings)
    if not isinstance(storage, S3Storage):
        return
    try:
        created = storage.ensure_bucket()
    except StorageError as exc:
        raise ValueError(str(exc)) from exc  # printed as `krona migrate: error: …`
    print(f"S3 bucket {storage.bucket!r} at {storage.endpoint}: {'created' if created else 'exists'}")


def _ensure_default_tenant(settings) -> Path:
    """First start: create tenant 'default' and write its key to <data_dir>/api-key (mode 600)."""
    # lazy: loads sqlalchemy
    from sqlalchemy import select

    # lazy: loads sqlalchemy
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
    # lazy: loads sqlalchemy, numpy, fastapi, …
    import uvicorn

    # lazy: loads fastapi, sqlalchemy
    from services.gateway.app import configure_logging

    configure_logging()
    # Open event streams end when the server stops: without a bound, uvicorn waits for every follower to hang up.
    config = uvicorn.Config(
        "services.gateway.app:create_served_app",
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=GATEWAY_GRACEFUL_SECONDS,
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


def _lock_data_dir(data_dir: Path):
    """Hold ``<data dir>/up.lock`` for this process's life: one `krona up` per data folder (CliError otherwise)."""

    path = data_dir / "up.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise CliError(
            f"another `krona up` ({owner}) is using {data_dir}; stop it first (Ctrl-C in its terminal), or give this "
            "one another --data-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _check_port(host: str, port: int) -> None:
    """CliError when something listens on host:port already (before anything starts)."""

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"port {port} on {host} is in use (another server?); stop it or pass --port") from None
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _gateway_line_to_terminal(line: str, previous: bool) -> bool:
    """Gateway output: its JSON log lines at WARNING and above (and anything that is not a log line) reach the
    terminal; access lines (INFO) only the log file."""

    if not line.strip():
        return False
    try:
        record = json.loads(line)
    except ValueError:
        return True
    return not isinstance(record, dict) or record.get("level") in ("WARNING", "ERROR", "CRITICAL")


def _worker_line_to_terminal(line: str, previous: bool) -> bool:
    """Celery output: its log lines at WARNING and above, with the lines that follow them (a traceback); the
    banner and the info lines only the log file."""

    match = re.match(r"^\[[^\]]*: (\w+)/[^\]]*\] ?(.*)$", line)
    if match:
        # Celery logs what the task prints to stderr as warnings: diffusers' progress bars are not.
        progress_bar = re.search(r"\d+%\||[0-9.]+(it/s|s/it)\]|^\x1b?\[A$", match.group(2))
        return match.group(1) in ("WARNING", "ERROR", "CRITICAL") and not progress_bar
    return previous and bool(line.strip())


def _no_job_running(settings):
    """True when no training, generation or adapter evaluation is running (embedded: none on our worker)."""

    def idle() -> bool:
        # lazy: loads sqlalchemy
        from sqlalchemy import func, select

        # lazy: loads sqlalchemy
        from shared.db import Adapter, Generation, Training, make_engine

        engine = make_engine(settings.resolved_database_url)
        try:
            with engine.connect() as conn:
                running = 0
                for model in (Training, Generation):
                    query = select(func.count()).select_from(model).where(model.status == "running")
                    running += conn.execute(query).scalar_one()
                evaluating = Adapter.evaluation["status"].as_string().in_(("queued", "running"))
                running += conn.execute(select(func.count()).select_from(Adapter).where(evaluating)).scalar_one()
            return running == 0
        finally:
            engine.dispose()

    return idle


def _ready(url: str):
    # lazy: loads httpx
    import httpx

    def probe() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def _children(settings, args: argparse.Namespace, env: dict[str, str], logs: Path) -> list[Child]:
    """`krona up`'s processes: the gateway, the job worker and the webhook worker."""
    gateway_cmd = [sys.executable, "-m", "services.cli.main", "gateway", "--host", args.host, "--port", str(args.port)]
    return [
        Child("gateway", gateway_cmd, env, log_file=logs / "gateway.log", to_terminal=_gateway_line_to_terminal,
              stop_timeout=10.0),
        # SIGTERM drains the job worker: a training checkpoints and hands over, a batch finishes.
        Child("worker", worker_command("train,infer", "krona-embedded@%h"), env, stop_timeout=WORKER_STOP_SECONDS,
              log_file=logs / "worker.log", to_terminal=_worker_line_to_terminal, idle=_no_job_running(settings)),
        Child(
            "webhooks",
            worker_command("webhooks", "krona-webhooks@%h", webhook_concurrency=settings.webhook_concurrency),
            env,
            log_file=logs / "webhooks.log",
            to_terminal=_worker_line_to_terminal,
            # Idle, Celery takes ~4 s to stop; a delivery cut short is claimed and retried (at least once).
            stop_timeout=WEBHOOKS_STOP_SECONDS,
            quiet_kill=True,
        ),
    ]  # fmt: skip


def up(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(data_dir)  # noqa: F841 - held until exit
    _check_port(args.host, args.port)
    # lazy: loads sqlalchemy
    from shared.db import upgrade_to_head

    upgrade_to_head(settings.resolved_database_url)
    _ensure_bucket(settings)
    # Build (once) or resolve the base model here, before the children start, so that the first job does not
    # wait for the build (the gateway reads the UNet config either way, without building).
    resolve_base_model(settings.base_model)
    key_file = _ensure_default_tenant(settings)
    env = {**os.environ, "KRONA_DATA_DIR": str(data_dir)}
    env.setdefault("KRONA_PUBLIC_URL", f"http://{args.host}:{args.port}")
    if settings.base_model.startswith("tiny-"):
        # The built-in models' operations are too small to share among threads, and torch's threads spin while
        # they wait for each other: on a busy 2-core machine one thread trained 25 steps in 6.5 s against 76 s
        # with the default. A real model keeps torch's default (or the OMP_NUM_THREADS given).
        env.setdefault("OMP_NUM_THREADS", "1")
    logs = data_dir / "logs"
    supervisor = Supervisor(_children(settings, args, env, logs), data_dir)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    url = f"http://{connect_host}:{args.port}"
    print(f"starting Krona on http://{args.host}:{args.port} (data in {data_dir}, logs in {logs})")
    print(f"API key of tenant '{DEFAULT_TENANT}': {key_file.read_text().strip()}  (also in {key_file})")
    print(f"webhook signing secret of tenant '{DEFAULT_TENANT}' is in {key_file.parent / 'webhook-secret'}")
    if settings.base_model.startswith("tiny-"):
        print(f"base model {settings.base_model}: random weights built offline, so images are noise")
    sys.stdout.flush()

    def announce() -> None:
        print(f"Krona is up at {url} (it answers /readyz). Ctrl-C stops it.", flush=True)

    supervisor.start()
    # A child that dies (a crashed worker, an OOM kill) is started again with backoff; the others keep
    # serving. Only Ctrl-C or SIGTERM stops the whole stack.
    supervisor.run_until_signal(ready=_ready(url), on_ready=announce)
    print("Krona stopped.", flush=True)
    return 0

"""The shared pytest fixtures (registered by tests/conftest.py): tiny models, real services, the API, stacks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers.api import RecordingEnqueuer
from helpers.models import build_tiny_unet
from helpers.services import (
    REDIS_URL,
    ROOT,
    KronaUp,
    SeaweedFS,
    fresh_postgres_database,
    start_gateway,
    stop_gateway,
)
from helpers.webhooks import Receiver
from shared.db import Tenant, Training, make_engine, make_session_factory, utcnow
from shared.settings import Settings
from shared.storage import LocalStorage
from shared.tenants import create_tenant


@pytest.fixture
def tiny_unet():
    return build_tiny_unet()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache for the session, so each tiny model is built once."""
    cache = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        from shared.models import tiny

        patch.setenv(tiny.CACHE_ENV_VAR, str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_folders(model_cache: Path) -> dict[str, Path]:
    from shared.models import BUILTIN_MODELS, resolve_base_model

    return {name: Path(resolve_base_model(name)) for name in BUILTIN_MODELS}


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh, migrated database for this test session, dropped at the end."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def stack_database():
    """A database of its own for a ``stack``: its real worker takes the fairest queued job of any tenant, so
    other tests' queued rows in the session's database would be served (or failed) before this test's."""
    with fresh_postgres_database("krona_stack") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"Redis at 127.0.0.1:6379 is required (make test starts it): {exc}")
    client.flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's SeaweedFS (S3) on loopback."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server.info
    server.stop()


@pytest.fixture
def s3_storage(s3_server):
    """An S3Storage on a fresh bucket of the session's SeaweedFS."""
    import uuid

    from shared.storage import S3Storage

    storage = S3Storage(
        endpoint=s3_server["endpoint"],
        bucket=f"t{uuid.uuid4().hex[:12]}",
        access_key=s3_server["access_key"],
        secret_key=s3_server["secret_key"],
    )
    storage.ensure_bucket()
    return storage


@pytest.fixture
def api(postgres_url, tiny_folders, tmp_path):
    """The gateway on the session's PostgreSQL, local storage, a recording enqueuer, two fresh tenants."""
    import uuid

    from fastapi.testclient import TestClient

    from helpers.api import Api, RecordingEnqueuer
    from services.gateway.app import create_app
    from shared.db import make_engine, make_session_factory
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant

    settings = Settings(database_url=postgres_url, data_dir=tmp_path, blob_dir=tmp_path / "blobs", base_model="tiny-sd")
    enqueuer = RecordingEnqueuer()
    app = create_app(settings, enqueuer=enqueuer, storage=LocalStorage(tmp_path / "blobs"))
    sessions = make_session_factory(make_engine(postgres_url))
    keys = {}
    with sessions() as session:
        for name in ("acme", "globex"):
            _, keys[name] = create_tenant(session, f"{name}-{uuid.uuid4().hex[:6]}")
        session.commit()
    with TestClient(app) as client:
        yield Api(client=client, context=app.state.context, enqueuer=enqueuer, keys=keys)


@pytest.fixture
def stack_s3(s3_server):
    """The S3 server of the ``stack`` fixture (a module may override it with one of its own)."""
    return s3_server


@pytest.fixture
def stack(stack_database, redis_url, stack_s3, tiny_folders, tmp_path, monkeypatch):
    """The gateway (TestClient) on PostgreSQL (a database of its own), Redis and SeaweedFS, one tenant, and
    ``start_worker(name, queues)``."""
    postgres_url = stack_database
    import os
    import signal
    import subprocess
    import sys
    import uuid

    from fastapi.testclient import TestClient

    from shared.db import make_engine, make_session_factory
    from shared.storage import S3Storage
    from shared.tenants import create_tenant

    bucket = f"e2e{uuid.uuid4().hex[:10]}"
    S3Storage(
        endpoint=stack_s3["endpoint"],
        bucket=bucket,
        access_key=stack_s3["access_key"],
        secret_key=stack_s3["secret_key"],
    ).ensure_bucket()
    env = {
        "KRONA_DATABASE_URL": postgres_url,
        "KRONA_BROKER_URL": redis_url,
        "KRONA_S3_ENDPOINT": stack_s3["endpoint"],
        "KRONA_S3_ACCESS_KEY": stack_s3["access_key"],
        "KRONA_S3_SECRET_KEY": stack_s3["secret_key"],
        "KRONA_S3_BUCKET": bucket,
        "KRONA_BASE_MODEL": "tiny-sd",
        "KRONA_DATA_DIR": str(tmp_path),
        "KRONA_LEASE_SECONDS": "8",
        "KRONA_REAPER_INTERVAL_SECONDS": "1",
        "KRONA_ENQUEUE_GRACE_SECONDS": "600",
        "KRONA_CHECKPOINT_EVERY": "2",
        "KRONA_WORKER_DEVICE": "cpu",
        # Webhook receivers in tests listen on 127.0.0.1; short deadlines and backoff keep the tests brief.
        "KRONA_ALLOW_PRIVATE_WEBHOOKS": "1",
        "KRONA_WEBHOOK_MAX_ATTEMPTS": "3",
        "KRONA_WEBHOOK_RETRY_BASE_SECONDS": "0.3",
        "KRONA_WEBHOOK_TIMEOUT_SECONDS": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shared.queue import celery_app
    from shared.settings import Settings, get_settings

    get_settings.cache_clear()
    celery_app.cache_clear()
    from services.gateway.app import create_app

    app = create_app(Settings())
    sessions = make_session_factory(make_engine(postgres_url))
    with sessions() as session:
        tenant, key = create_tenant(session, f"e2e-{uuid.uuid4().hex[:6]}")
        session.commit()
        webhook_secret = tenant.webhook_secret
    workers: list[subprocess.Popen] = []

    def start_worker(name: str, queues: str = "train,infer") -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "services.cli.main", "worker", "--queues", queues]
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        workers.append(process)
        return process

    with TestClient(app) as client:
        yield {
            "client": client,
            "headers": {"Authorization": f"Bearer {key}"},
            "sessions": sessions,
            "start_worker": start_worker,
            "webhook_secret": webhook_secret,
            "s3": stack_s3,
            "logs": tmp_path,
        }
    for process in workers:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    get_settings.cache_clear()
    celery_app.cache_clear()


@pytest.fixture
def embedded_stack(tiny_folders, tmp_path):
    """`krona up` (SQLite, local blobs, a job worker, a webhook worker) on a free port: (base URL, API key)."""
    up = KronaUp(tmp_path)
    try:
        up.wait(up.ready, "krona up ready", 120)
        yield up.base, up.api_key()
    finally:
        up.stop()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(mode: str = "ok") -> Receiver:
        made.append(Receiver(mode))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def hooks_runtime(postgres_url, tmp_path):
    """A worker runtime on PostgreSQL whose sends are recorded, and a factory of finished jobs with a webhook."""
    from shared.tenants import create_tenant
    from workers.runtime import build_runtime

    def runtime(**overrides):
        settings = Settings(database_url=postgres_url, data_dir=tmp_path, **overrides)
        rt = build_runtime(settings, storage=LocalStorage(tmp_path / "blobs"))
        rt.sent = []
        rt.send = lambda task, ref, countdown=None: rt.sent.append((task, ref, countdown))
        return rt

    def finished_training(rt, url: str, tenant_name: str | None = None) -> tuple[str, Tenant]:
        with rt.sessions() as session:
            tenant, _ = create_tenant(session, tenant_name or f"hooks-{uuid.uuid4().hex[:8]}")
            row = Training(
                tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="p", status="succeeded", webhook_url=url,
                webhook_state="waiting", finished_at=utcnow(), image_keys=["a", "b"], total_steps=3, step=3,
            )  # fmt: skip
            session.add(row)
            session.commit()
            session.refresh(tenant)
            session.expunge(tenant)
            return row.id, tenant

    return runtime, finished_training


@pytest.fixture
def live_gateway(postgres_url, redis_url, tiny_folders, tmp_path):
    """`krona gateway` in its own process; yields (base URL, sessions, an API key)."""
    env = {
        "KRONA_DATABASE_URL": postgres_url,
        "KRONA_BROKER_URL": redis_url,
        "KRONA_BASE_MODEL": "tiny-sd",
        "KRONA_DATA_DIR": str(tmp_path),
        "KRONA_EVENT_POLL_INTERVAL_SECONDS": "0.2",
    }
    process, base = start_gateway(tmp_path, env)
    sessions = make_session_factory(make_engine(postgres_url))
    with sessions() as session:
        _, key = create_tenant(session, f"load-{uuid.uuid4().hex[:6]}")
        session.commit()
    try:
        yield base, sessions, key
    finally:
        stop_gateway(process)


@pytest.fixture
def app_with(postgres_url, tmp_path):
    """Build a gateway on the session's database with extra settings (storage and broker stand-ins)."""
    from services.gateway.app import create_app
    from shared.storage import LocalStorage

    clients = []

    def build(**overrides) -> TestClient:
        base = {"database_url": postgres_url, "data_dir": tmp_path, "blob_dir": tmp_path / "blobs"}
        settings = Settings(**(base | overrides))
        app = create_app(settings, enqueuer=RecordingEnqueuer(), storage=LocalStorage(tmp_path / "blobs"))
        client = TestClient(app)
        clients.append((client, app))
        return client

    yield build
    for client, app in clients:
        client.close()
        app.state.context.engine.dispose()

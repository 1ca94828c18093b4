"""Schemathesis against the embedded stack (`krona up`), with and without the key: every check, 0 failures.

Its configuration is `schemathesis.toml` at the repository root (what it adjusts, and why, is written there).
Bounded: a few examples per operation, about a minute in all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _schemathesis(base: str, *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json", "--checks", "all",
               "--max-examples", "10", "--seed", "20261129", *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_schemathesis_finds_no_failure(embedded_stack):
    import httpx

    base, key = embedded_stack
    operations = sum(len(ops) for ops in httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"].values())
    for label, args in (("with the key", ["-H", f"Authorization: Bearer {key}"]), ("without a key", [])):
        result = _schemathesis(base, *args)
        summary = result.stdout[result.stdout.rfind("SUMMARY") :]
        print(label, summary[-1500:])
        assert result.returncode == 0, f"{label}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
        assert f"Tested: {operations}" in summary, summary  # every operation was reached

"""Schemathesis against the embedded stack (`krona up`), with and without the keys: every check, 0 failures.

Its configuration is `schemathesis.toml` at the repository root (what it adjusts, and why, is written there).
Bounded: a few examples per operation, about a minute in all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _schemathesis(base: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
               f"{base}/openapi.json", "--checks", "all", "--max-examples", "10", "--seed", "20261129",
               *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _with_admin_key(data_dir: Path, folder: Path) -> Path:
    """schemathesis.toml plus an admin key of `krona up`'s database for the admin operations (tag `tenants`):
    with the tenant's key alone they could only answer 403."""
    from shared.db import make_engine, make_session_factory
    from shared.tenants import create_api_key

    engine = make_engine(f"sqlite:///{(data_dir / 'krona.db').resolve()}")
    with make_session_factory(engine)() as session:
        key = create_api_key(session, None, name="schemathesis", role="admin")
        session.commit()
    engine.dispose()
    config = folder / "schemathesis.toml"
    admin = f'\n[[operations]]\ninclude-tag = "tenants"\nheaders = {{ Authorization = "Bearer {key}" }}\n'
    config.write_text((ROOT / "schemathesis.toml").read_text() + admin)
    return config


# What can take the run's own tenant away (delete it, throttle it, revoke its key): run last, on their own, so that
# the other operations are tested with a working key.
DESTRUCTIVE = ("deleteTenant", "updateTenant", "revokeApiKey")


def test_schemathesis_finds_no_failure(embedded_stack, tmp_path):
    import httpx

    base, key = embedded_stack
    paths = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    operations = sum(len(ops) for ops in paths.values())
    of_keys_and_tenants = sum(
        len(ops) for path, ops in paths.items() if path.startswith(("/v1/tenants", "/v1/api-keys"))
    )
    with_admin = _with_admin_key(tmp_path / "krona-data", tmp_path)  # the folder of KronaUp(tmp_path)
    bearer = ["-H", f"Authorization: Bearer {key}"]
    runs = (
        ("with the keys", with_admin, [*bearer, "--exclude-operation-id-regex", f"^({'|'.join(DESTRUCTIVE)})$"],
         operations - len(DESTRUCTIVE)),
        ("keys and tenants, destructive ones included", with_admin, [*bearer, "--include-tag-regex",
         "^(tenants|api-keys)$"], of_keys_and_tenants),
        ("without a key", ROOT / "schemathesis.toml", [], operations),
    )  # fmt: skip
    for label, config, args, tested in runs:
        result = _schemathesis(base, config, *args)
        summary = result.stdout[result.stdout.rfind("SUMMARY") :]
        print(label, summary[-1500:])
        assert result.returncode == 0, f"{label}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
        assert f"Tested: {tested}" in summary, summary  # every operation was reached

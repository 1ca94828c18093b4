"""Fair scheduling: tenant B's latency under tenant A's backlog, and the scheduler's cost per job claim.

    python benchmarks/fairness.py [--backlog 200] [--tenants 1,10,100] [--queued 2000] [--claims 300]
                                  [--skip-stack] [--json benchmarks/results/fairness.json]

1. Latency (the embedded stack, `krona up`: SQLite, the kombu SQLAlchemy broker, one solo worker, tiny-sd):
   tenant B's 64x64, 20-step generation alone (best of 5 after 3 warm-up runs), then right after tenant A
   submits a batch of ``--backlog`` such generations. Also how long A's batch takes to drain: what B
   would have waited behind it with the old first-in-first-out queue.
2. Claim cost: ``workers.lease.claim_next`` (pick the fairest tenant, claim its oldest job, charge its
   counter, one commit) against the claim of a named job by id (what a worker did before), on
   PostgreSQL (127.0.0.1:5432, trust auth, a fresh database) and SQLite, with ``--queued`` queued jobs
   spread over 1, 10 and 100 tenants.

On a 2-core machine the client, gateway, worker and database share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


# 1. Latency under a backlog ----------------------------------------------------------------------------


def _up(data_dir: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
    env["KRONA_DATA_DIR"] = str(data_dir)
    log = open(data_dir.parent / "up.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def _wait_ready(base: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("krona up exited")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("krona up was not ready in time")


def _generate(client, key: str, timeout: float = 600) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    job = client.post("/v1/generations", headers=headers, json={"prompt": "b", "steps": 20}).json()
    while time.monotonic() - started < timeout:
        body = client.get(f"/v1/generations/{job['id']}", headers=headers).json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            if body["status"] != "succeeded":
                raise RuntimeError(f"generation {body['status']}: {body.get('error')}")
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError("generation did not finish")


def latency_under_backlog(backlog: int) -> dict:
    import signal

    import httpx

    from shared.db import make_engine, make_session_factory
    from shared.tenants import create_tenant

    with tempfile.TemporaryDirectory(prefix="krona-fair-") as tmp:
        data_dir = Path(tmp) / "krona-data"
        process, base = _up(data_dir)
        try:
            _wait_ready(base, process)
            key_a = (data_dir / "api-key").read_text().strip()
            engine = make_engine(f"sqlite:///{data_dir / 'krona.db'}")
            with make_session_factory(engine)() as session:
                _, key_b = create_tenant(session, "tenant-b")
                session.commit()
            engine.dispose()
            with httpx.Client(base_url=base, timeout=30) as client:
                for _ in range(3):  # the engine loads on the first request; the next few are still slower
                    _generate(client, key_b)
                idle = min(_generate(client, key_b) for _ in range(5))
                headers_a = {"Authorization": f"Bearer {key_a}"}
                submitted = time.monotonic()
                batch = client.post(
                    "/v1/batches",
                    headers=headers_a,
                    json={"generations": [{"prompt": f"a{i}", "steps": 20} for i in range(backlog)]},
                ).json()
                time.sleep(0.5)
                loaded = _generate(client, key_b)
                while True:
                    counts = client.get(f"/v1/batches/{batch['id']}", headers=headers_a).json()["counts"]
                    if counts["succeeded"] + counts["failed"] + counts["canceled"] == backlog:
                        break
                    time.sleep(0.5)
                drained = time.monotonic() - submitted
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return {
        "backlog": backlog,
        "b_idle_seconds": round(idle, 3),
        "b_under_backlog_seconds": round(loaded, 3),
        "ratio_to_idle": round(loaded / idle, 2),
        "bound_seconds": round(3 * idle + 2, 3),
        "a_backlog_drain_seconds": round(drained, 2),
    }


# 2. Claim cost -------------------------------------------------------------------------------------------


def _fresh_postgres() -> tuple[str, callable]:
    from sqlalchemy import create_engine, text

    from shared.db import upgrade_to_head

    name = f"krona_fair_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    upgrade_to_head(url)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def claim_cost(url: str, tenants: int, queued: int, claims: int) -> dict:
    from sqlalchemy import delete

    from shared.db import Generation, Tenant, TenantService, make_engine, make_session_factory, new_id
    from shared.scheduler import generation_cost, lift_on_submit
    from shared.settings import Settings
    from shared.tenants import create_tenant
    from workers.lease import claim, claim_next

    engine = make_engine(url)
    sessions = make_session_factory(engine)
    settings = Settings(database_url=url)
    with sessions() as session:
        session.execute(delete(Generation))
        session.execute(delete(TenantService))
        session.execute(delete(Tenant))
        session.commit()
        ids = [create_tenant(session, f"t{i}-{uuid.uuid4().hex[:6]}")[0].id for i in range(tenants)]
        session.commit()
        for i, tenant_id in enumerate(ids):
            lift_on_submit(session, Generation, tenant_id)
            per = queued // tenants + (1 if i < queued % tenants else 0)
            session.add_all(
                Generation(
                    id=new_id("gen"), tenant_id=tenant_id, prompt="p", width=64, height=64, steps=20, seed=0,
                    cost=generation_cost(64, 64, 20, 1),
                )
                for _ in range(per)
            )  # fmt: skip
        session.commit()
    fair, by_id = [], []
    with sessions() as session:
        for _ in range(claims):
            start = time.perf_counter()
            job_id = claim_next(session, Generation, settings, "bench", 60)
            fair.append(time.perf_counter() - start)
            assert job_id is not None
        named = [
            row for (row,) in session.execute(
                Generation.__table__.select().with_only_columns(Generation.id)
                .where(Generation.status == "queued").limit(claims)
            )
        ]  # fmt: skip
        for job_id in named:
            start = time.perf_counter()
            assert claim(session, Generation, job_id, "bench", 60)
            by_id.append(time.perf_counter() - start)
    engine.dispose()
    ms = 1000.0
    return {
        "tenants": tenants,
        "queued": queued,
        "fair_claim_ms_p50": round(statistics.median(fair) * ms, 3),
        "fair_claim_ms_p99": round(_percentile(fair, 0.99) * ms, 3),
        "claim_by_id_ms_p50": round(statistics.median(by_id) * ms, 3),
        "claim_by_id_ms_p99": round(_percentile(by_id, 0.99) * ms, 3),
        "overhead_ms_p50": round((statistics.median(fair) - statistics.median(by_id)) * ms, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=200)
    parser.add_argument("--tenants", default="1,10,100")
    parser.add_argument("--queued", type=int, default=2000)
    parser.add_argument("--claims", type=int, default=300)
    parser.add_argument("--skip-stack", action="store_true", help="only the claim cost")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results: dict = {"machine": f"{os.cpu_count()} cores", "claims": []}

    if not args.skip_stack:
        latency = latency_under_backlog(args.backlog)
        results["latency"] = latency
        print("tenant B's generation (64x64, 20 steps) on the embedded stack")
        print(f"  idle (best of 5)                 {latency['b_idle_seconds']:8.2f} s")
        print(f"  behind A's batch of {args.backlog:<4}         {latency['b_under_backlog_seconds']:8.2f} s  "
              f"({latency['ratio_to_idle']}x idle; bound 3x idle + 2 s = {latency['bound_seconds']} s)")  # fmt: skip
        print(f"  A's batch drained in             {latency['a_backlog_drain_seconds']:8.2f} s  "
              "(B's wait behind it first-in-first-out)")  # fmt: skip

    pg_url, drop = _fresh_postgres()
    sqlite_dir = tempfile.mkdtemp(prefix="krona-fair-sqlite-")
    sqlite_url = f"sqlite:///{sqlite_dir}/fair.db"
    from shared.db import upgrade_to_head

    upgrade_to_head(sqlite_url)
    try:
        print(f"\nclaim cost, {args.queued} queued jobs, {args.claims} claims (ms)")
        print(f"{'database':<11}{'tenants':>8}{'fair p50':>10}{'fair p99':>10}{'by id p50':>11}{'by id p99':>11}"
              f"{'overhead':>10}")  # fmt: skip
        for database, url in (("postgresql", pg_url), ("sqlite", sqlite_url)):
            for tenants in (int(t) for t in args.tenants.split(",")):
                row = {"database": database, **claim_cost(url, tenants, args.queued, args.claims)}
                results["claims"].append(row)
                print(f"{database:<11}{tenants:>8}{row['fair_claim_ms_p50']:>10.2f}{row['fair_claim_ms_p99']:>10.2f}"
                      f"{row['claim_by_id_ms_p50']:>11.2f}{row['claim_by_id_ms_p99']:>11.2f}"
                      f"{row['overhead_ms_p50']:>10.2f}")  # fmt: skip
    finally:
        drop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

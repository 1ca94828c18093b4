"""The fair scheduler at platform scale: what one claim costs with 1,000 to 100,000 queued jobs (issue 24, item 3).

    python benchmarks/scheduler_scale.py [--points 500:1000,500:50000,1000:1000,1000:10000,1000:100000]
                                         [--claims 300] [--gathers 40] [--misses 10] [--baseline REV]
                                         [--databases postgresql,sqlite] [--json PATH]

For each point TENANTS:QUEUED, a fresh PostgreSQL database (127.0.0.1:5432, trust auth; dropped at the end), or a
SQLite file, gets
TENANTS tenants, each with a fair-share counter (all level, as new tenants are), and QUEUED queued generations
spread evenly over them, half of them 512x512 and half 768x768 (alternating within each tenant, so every tenant
has both sizes), then VACUUM ANALYZE (see ``populate``). Then:

- ``claim``: ``workers.lease.claim_next`` as a worker calls it (pick the fairest tenant's oldest job, claim it,
  charge the tenant's counter, commit), ``--claims`` times in a row; median and p99 in milliseconds;
- ``gather``: the inference gatherer's pattern (workers/inference/job.py): one claim without filters, then up to
  7 claims with its compatibility filters (same width, height, steps and guidance as the first, ``num_images``
  that still fit), ``--gathers`` times; the filtered claims' median and p99, and their ratio to the plain claim's
  median ("the gatherer's repeated picks cost no more than one claim each": a ratio of at most 1);
- ``claim_by_id``: claiming a named job (``workers.lease.claim``), the floor under any scheduler;
- ``pick`` / ``filtered_pick``: the scheduler's own part of the plain and of the filtered claims
  (``shared.scheduler.pick``), the rest of a claim being the lease's UPDATE, the counter's charge and the commit
  (whose deferred trigger updates the tenant's queued counter): on a loaded machine the commit's round trips
  dominate a claim, and the pick is what the scheduler decides;
- ``miss``: a filtered claim that matches no queued job (the gatherer's last pick when nothing fits);
- with ``--baseline REV``, every point again with shared/scheduler.py of that git revision (same database, reset
  to the same state), for a before/after in the same run.

Claimed jobs stay running (nothing finishes them), so a run takes a few hundred of the queued jobs. The JSON
holds the commit, the date, the load average before and after each point, and every row; the table is printed.
On the 2-core VM the benchmark, PostgreSQL and anything else running share the cores: say the load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from benchmarks.fairness import _fresh_postgres, _percentile  # noqa: E402

DEFAULT_POINTS = "500:1000,500:50000,1000:1000,1000:10000,1000:100000"
SIZES = (512, 768)
MAX_BATCH = 8


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dirty() -> bool:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "shared/scheduler.py", "migrations"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(out.strip())


def populate(engine, sessions, database: str, tenants: int, queued: int) -> None:
    """``tenants`` tenants level at counter 0 (as ``lift_on_submit`` leaves new tenants) and ``queued`` queued
    generations, inserted in tenant order with sizes alternating. On PostgreSQL the rows go in with the triggers
    off (``session_replication_role = replica``) and the queued counters are then set in one statement to what
    the triggers would have made them (100,000 deferred trigger calls take minutes on this VM); then VACUUM
    ANALYZE, what autovacuum would have done by the time a real queue had grown this long."""
    from sqlalchemy import delete, insert

    from shared.db import Generation, Tenant, TenantService, new_id, utcnow
    from shared.scheduler import generation_cost

    with sessions() as session:
        for model in (Generation, TenantService, Tenant):
            session.execute(delete(model))
        session.commit()
        if database == "postgresql":
            session.execute(text("SET session_replication_role = replica"))
        ids = [new_id("ten") for _ in range(tenants)]
        session.execute(
            insert(Tenant),
            [{"id": t, "name": f"scale-{t}", "webhook_secret": "s" * 32, "weight": 1.0, "limits": {}} for t in ids],
        )
        session.execute(
            insert(TenantService), [{"tenant_id": t, "queue": "infer", "counter": 0.0, "updated_at": T0} for t in ids]
        )
        rows = []
        for i, tenant_id in enumerate(ids):
            per = queued // tenants + (1 if i < queued % tenants else 0)
            for j in range(per):
                size = SIZES[j % 2]
                rows.append(
                    {
                        "id": new_id("gen"), "tenant_id": tenant_id, "prompt": "p", "width": size, "height": size,
                        "steps": 20, "guidance_scale": 7.5, "num_images": 1, "seed": 0, "status": "queued",
                        "cost": generation_cost(size, size, 20, 1), "created_at": utcnow(),
                    }
                )  # fmt: skip
            if len(rows) >= 5000 or i == len(ids) - 1:
                session.execute(insert(Generation), rows)
                rows = []
        if database == "postgresql":
            session.execute(text("SET session_replication_role = origin"))
            session.execute(text(_COUNT_QUEUED))
        session.commit()
    _vacuum(engine, database)


_COUNT_QUEUED = """UPDATE tenants SET queued_generations =
    (SELECT count(*) FROM generations WHERE generations.tenant_id = tenants.id AND generations.status = 'queued')"""
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _vacuum(engine, database: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE" if database == "postgresql" else "ANALYZE")


def reset(engine, sessions, database: str) -> None:
    """Back to the state ``populate`` left: every claimed job queued again (the triggers count it back), every
    counter at 0. So that a second implementation starts where the first did."""
    from sqlalchemy import update

    from shared.db import Generation, TenantService

    with sessions() as session:
        session.execute(
            update(Generation)
            .where(Generation.status == "running")
            .values(status="queued", attempts=0, lease_owner=None, lease_expires_at=None, started_at=None)
        )
        session.execute(update(TenantService).values(counter=0.0, updated_at=T0))
        session.commit()
    _vacuum(engine, database)


def _compatible(first, images: int) -> tuple:
    """The gatherer's filters (workers/inference/job.py: _gather)."""
    from shared.db import Generation

    return (
        Generation.width == first.width,
        Generation.height == first.height,
        Generation.steps == first.steps,
        Generation.guidance_scale == first.guidance_scale,
        Generation.num_images <= MAX_BATCH - images,
    )


def time_claims(sessions, settings, claims: int, gathers: int, misses: int, phase: dict) -> dict[str, list[float]]:
    """Seconds per claim: plain claims, the gatherer's filtered claims, filtered claims that match nothing, and
    claims of a named job. ``phase["kind"]`` says which kind of claim is running (for the pick timer)."""
    from sqlalchemy import select

    from shared.db import Generation
    from workers.lease import claim, claim_next

    times: dict[str, list[float]] = {"claim": [], "filtered": [], "miss": [], "by_id": []}

    def timed(kind: str, call):
        phase["kind"] = kind
        start = time.perf_counter()
        result = call()
        times[kind].append(time.perf_counter() - start)
        phase["kind"] = None
        return result

    with sessions() as session:
        for _ in range(5):  # warm the connection and the statement caches
            claim_next(session, Generation, settings, "warm", 60)
        for _ in range(claims):
            assert timed("claim", lambda: claim_next(session, Generation, settings, "bench", 60)) is not None
        for _ in range(gathers):
            first = session.get(Generation, claim_next(session, Generation, settings, "bench", 60))
            for images in range(first.num_images, MAX_BATCH):
                filters = _compatible(first, images)
                if timed("filtered", lambda f=filters: claim_next(session, Generation, settings, "b", 60, filters=f)):
                    continue
                break
        nothing = (Generation.width == 1024, Generation.height == 1024)  # no queued job has this size
        for _ in range(misses):  # the gatherer's last pick when no queued job is compatible
            assert timed("miss", lambda: claim_next(session, Generation, settings, "b", 60, filters=nothing)) is None
        named = session.scalars(select(Generation.id).where(Generation.status == "queued").limit(claims)).all()
        for job_id in named:
            assert timed("by_id", lambda job_id=job_id: claim(session, Generation, job_id, "bench", 60))
    return times


@contextlib.contextmanager
def implementation(module, picks: dict[str, list[float]], phase: dict):
    """Run the workers' claims with ``module``'s pick and charge (None: the checked-out shared/scheduler.py), the
    seconds of every pick of a timed claim appended to ``picks[phase["kind"]]`` (the scheduler's own part)."""
    import workers.lease as lease

    saved = lease.pick, lease.charge
    pick = saved[0] if module is None else module.pick

    def timed_pick(*args, **kwargs):
        start = time.perf_counter()
        try:
            return pick(*args, **kwargs)
        finally:
            if phase.get("kind"):
                picks.setdefault(phase["kind"], []).append(time.perf_counter() - start)

    lease.pick = timed_pick
    if module is not None:
        lease.charge = module.charge
    try:
        yield
    finally:
        lease.pick, lease.charge = saved


def load_baseline(revision: str):
    """shared/scheduler.py as it was at ``revision`` (git), as a module: the before of a before/after."""
    source = subprocess.run(
        ["git", "show", f"{revision}:shared/scheduler.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"scheduler_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:shared/scheduler.py", "exec"), module.__dict__)
    return module


def measure(url: str, database: str, tenants: int, queued: int, args, implementations: dict) -> list[dict]:
    from shared.db import make_engine, make_session_factory
    from shared.settings import Settings

    engine = make_engine(url)
    sessions = make_session_factory(engine)
    settings = Settings(database_url=url)
    started = time.perf_counter()
    populate(engine, sessions, database, tenants, queued)
    populate_s = time.perf_counter() - started
    rows = []
    for i, (name, module) in enumerate(implementations.items()):
        if i:
            reset(engine, sessions, database)
        load_before = os.getloadavg()[0]
        picks: dict[str, list[float]] = {}
        phase: dict = {}
        with implementation(module, picks, phase):
            times = time_claims(sessions, settings, args.claims, args.gathers, args.misses, phase)
        # A claim whose first pick was taken by another worker picks again: these are all the picks' times.
        times["pick"], times["filtered_pick"] = picks["claim"], picks.get("filtered", [0.0])
        row = {"database": database, "implementation": name, "tenants": tenants, "queued": queued}
        for kind, values in times.items():
            row[f"{kind}_ms_p50"] = round(statistics.median(values) * 1000, 3)
            row[f"{kind}_ms_p99"] = round(_percentile(values, 0.99) * 1000, 3)
            row[f"{kind}_count"] = len(values)
        row["filtered_to_claim_p50"] = round(row["filtered_ms_p50"] / row["claim_ms_p50"], 2)
        row["filtered_pick_to_claim_p50"] = round(row["filtered_pick_ms_p50"] / row["claim_ms_p50"], 2)
        row["load_average_before"] = round(load_before, 2)
        row["load_average_after"] = round(os.getloadavg()[0], 2)
        row["populate_seconds"] = round(populate_s, 1)
        rows.append(row)
        print(_table([row]).splitlines()[-1], flush=True)
    engine.dispose()
    return rows


TABLE = (
    ("database", "database", "{}"),
    ("pick", "implementation", "{}"),
    ("tenants", "tenants", "{:,}"),
    ("queued", "queued", "{:,}"),
    ("claim p50 ms", "claim_ms_p50", "{:.2f}"),
    ("claim p99 ms", "claim_ms_p99", "{:.2f}"),
    ("its pick p50 ms", "pick_ms_p50", "{:.2f}"),
    ("filtered p50 ms", "filtered_ms_p50", "{:.2f}"),
    ("filtered p99 ms", "filtered_ms_p99", "{:.2f}"),
    ("filtered / claim", "filtered_to_claim_p50", "{:.2f}"),
    ("its pick p50 ms", "filtered_pick_ms_p50", "{:.2f}"),
    ("no match p50 ms", "miss_ms_p50", "{:.2f}"),
    ("by id p50 ms", "by_id_ms_p50", "{:.2f}"),
    ("load before", "load_average_before", "{:.1f}"),
    ("load after", "load_average_after", "{:.1f}"),
)


def _table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in TABLE) + " |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    """Against the goal, per database and implementation: under 5 ms median at 100,000 queued jobs across 1,000
    tenants, flat within 2x from 1,000 to 100,000, and filtered claims no dearer than a plain one."""
    summary: dict = {}
    for database, name in sorted({(r["database"], r["implementation"]) for r in rows}):
        at = {(r["tenants"], r["queued"]): r for r in rows if (r["database"], r["implementation"]) == (database, name)}
        big, small = at.get((1000, 100_000)), at.get((1000, 1000))
        entry = {
            "filtered_to_claim_p50_max": max(r["filtered_to_claim_p50"] for r in at.values()),
            "filtered_pick_to_claim_p50_max": max(r["filtered_pick_to_claim_p50"] for r in at.values()),
            "pick_ms_p50_max": max(r["pick_ms_p50"] for r in at.values()),
        }
        if big:
            entry["claim_ms_p50_at_100k_1000_tenants"] = big["claim_ms_p50"]
        if big and small:
            entry["flatness_100k_over_1k"] = round(big["claim_ms_p50"] / small["claim_ms_p50"], 2)
        summary[f"{database} {name}"] = entry
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default=DEFAULT_POINTS, help="TENANTS:QUEUED,... (default %(default)s)")
    parser.add_argument("--claims", type=int, default=300, help="plain claims timed per point")
    parser.add_argument("--gathers", type=int, default=40, help="gatherer rounds (1 + up to 7 filtered claims)")
    parser.add_argument("--misses", type=int, default=10, help="filtered claims that match no queued job")
    parser.add_argument("--baseline", metavar="REV", help="also time shared/scheduler.py of this git revision")
    parser.add_argument("--databases", default="postgresql", help="postgresql,sqlite (embedded mode)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")]
    from shared.db import upgrade_to_head

    implementations = {"current": None}
    if args.baseline:
        implementations[f"at {args.baseline}"] = load_baseline(args.baseline)
    results: dict = {
        "benchmark": "scheduler_scale",
        "commit": _commit(),
        "uncommitted_scheduler_changes": _dirty(),
        "baseline": args.baseline,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": [],
    }
    print(f"# scheduler_scale at {results['commit']}, load average {results['load_average_at_start']}")
    print(_table([]))
    databases = args.databases.split(",")
    for database in databases:
        for tenants, queued in points:
            if database == "postgresql":
                url, drop = _fresh_postgres()
            else:
                tmp = tempfile.mkdtemp(prefix="krona-scale-")
                url, drop = f"sqlite:///{tmp}/scale.db", (lambda: None)
                upgrade_to_head(url)
            try:
                results["rows"] += measure(url, database, tenants, queued, args, implementations)
            finally:
                drop()
    results["summary"] = summarize(results["rows"])
    print()
    print(_table(results["rows"]))
    print("summary:", json.dumps(results["summary"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

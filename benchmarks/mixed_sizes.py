"""A request of another size behind a running loop: how long it waits, on the inference worker's real code path.

One worker process, in-process (``run_generation_job``, as its task runs it), on SQLite and local files, tiny-sd,
one torch thread. A tenant queues N generations of 64x64 (25 steps); while the worker's loop runs them, at its
second step, a 96x96 generation (10 steps) and, behind it, one more 64x64 arrive. Whenever a task returns with
work still queued the next message runs (as the queue's messages do). Reported per request kind: latency (its
``finished_at`` minus its ``created_at``), and the whole run's time.

Until the worker ran a loop per size (``LoopGroup``), the 96x96 request, the fairest, stopped joins: the 64x64
loop finished alone and the next task served it, so it waited for the whole 64x64 batch. With a loop per size it
starts at the next step boundary beside the running loop.

    python benchmarks/mixed_sizes.py --json benchmarks/results/mixed_sizes.json
    PYTHONPATH=/path/to/older/checkout python benchmarks/mixed_sizes.py   # the same on another commit
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
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _commit() -> str:
    root = Path(__import__("workers").__file__).resolve().parents[1]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_once(rt, tenant_id: str, backlog: int) -> dict:
    """One scenario; the latencies of the 96x96 request, the late 64x64 one and the backlog's."""
    from sqlalchemy import select

    from shared.db import Generation, JobStatus, new_id
    from shared.scheduler import generation_cost, lift_on_submit
    from workers.inference.job import run_generation_job
    from workers.inference.loop import DenoisingLoop

    def submit(size: int, steps: int, seed: int) -> str:
        with rt.sessions() as session:
            lift_on_submit(session, Generation, tenant_id)
            job_id = new_id("gen")
            session.add(Generation(id=job_id, tenant_id=tenant_id, prompt="a photo of sks dog", width=size,
                                   height=size, steps=steps, seed=seed, guidance_scale=5.0,
                                   cost=generation_cost(size, size, steps, 1)))  # fmt: skip
            session.commit()
        return job_id

    backlog_ids = [submit(64, 25, seed) for seed in range(backlog)]
    late: dict[str, str] = {}
    original = DenoisingLoop.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 2 and not late:
            late["other_size"] = submit(96, 10, 100)
            late["same_size"] = submit(64, 25, 101)
        return original(self)

    DenoisingLoop.step = step
    started = time.perf_counter()
    tasks = 0
    try:
        while True:
            with rt.sessions() as session:
                queued = session.scalar(
                    select(Generation.id)
                    .where(Generation.status == JobStatus.QUEUED, Generation.tenant_id == tenant_id)
                    .limit(1)
                )
            if queued is None:
                break
            run_generation_job(rt, queued)
            tasks += 1
    finally:
        DenoisingLoop.step = original
    wall = time.perf_counter() - started
    with rt.sessions() as session:
        rows = {job_id: session.get(Generation, job_id) for job_id in [*backlog_ids, *late.values()]}
        latency = {job_id: (row.finished_at - row.created_at).total_seconds() for job_id, row in rows.items()}
        statuses = {row.status for row in rows.values()}
    return {
        "wall_s": round(wall, 3),
        "tasks": tasks,
        "statuses": sorted(statuses),
        "other_size_s": round(latency[late["other_size"]], 3),
        "late_same_size_s": round(latency[late["same_size"]], 3),
        "backlog_max_s": round(max(latency[job_id] for job_id in backlog_ids), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=6, help="64x64 requests queued first")
    parser.add_argument("--rounds", type=int, default=3, help="the table gives the median")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from shared.db import upgrade_to_head
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant
    from workers.runtime import build_runtime

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="krona-mixed-sizes-"))
    url = f"sqlite:///{folder / 'krona.db'}"
    upgrade_to_head(url)
    settings = Settings(database_url=url, data_dir=folder, base_model="tiny-sd", engine_max_batch=8)
    rt = build_runtime(settings, storage=LocalStorage(folder / "blobs"))
    rt.send = lambda *a, **k: None  # messages only wake workers; this loop plays the next message
    with rt.sessions() as session:
        tenant, _ = create_tenant(session, "bench")
        session.commit()
        tenant_id = tenant.id
    run_once(rt, tenant_id, 1)  # warm-up: the engine loads, the first steps compile nothing but warm caches
    runs = [run_once(rt, tenant_id, args.backlog) for _ in range(args.rounds)]
    keys = ("other_size_s", "late_same_size_s", "backlog_max_s", "wall_s", "tasks")
    median = {key: statistics.median(run[key] for run in runs) for key in keys}
    commit = _commit()
    print(f"mixed sizes at {commit}: {args.backlog} x 64x64 (25 steps), then a 96x96 (10 steps) and a 64x64 (25 steps)")
    print("| commit | 96x96 latency s | late 64x64 latency s | backlog's last s | run s | tasks |")
    print("|---|---|---|---|---|---|")
    print(f"| {commit} | " + " | ".join(f"{median[key]:g}" for key in keys) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"commit": commit, "backlog": args.backlog, "runs": runs,
                                         "median": median}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The inference worker's step-level joining (workers/inference/job.py): requests that arrive while a loop runs join
it at the next step, the fair scheduler picks who joins, a tenant's running cap holds, a request of another size
runs in a loop of its own beside the first, drain lets the running requests finish and takes no new one, a
canceled request leaves, and a bad adapter fails only its request. On PostgreSQL and SQLite, with the real tiny-sd
engine."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from sqlalchemy import select, update

from shared.db import Adapter, Generation, UsageRecord

PROMPT = "a photo of sks dog"


@pytest.fixture(params=["postgresql", "sqlite"])
def rt(request, tmp_path, tiny_folders):
    """A worker runtime on a migrated database of each kind (the PostgreSQL one shared with other tests, whose
    queued jobs are canceled first: a worker serves the fairest job of any tenant)."""
    from shared.db import make_engine, make_session_factory, upgrade_to_head
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from workers.runtime import build_runtime

    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        engine = make_engine(url)
        with make_session_factory(engine)() as session:
            session.execute(update(Generation).where(Generation.status == "queued").values(status="canceled"))
            session.commit()
        engine.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'joining.db'}"
        upgrade_to_head(url)
    settings = Settings(database_url=url, data_dir=tmp_path, base_model="tiny-sd", engine_slots=4, engine_max_batch=8)
    runtime = build_runtime(settings, storage=LocalStorage(tmp_path / "blobs"))
    runtime.sent = []
    runtime.send = lambda task, job_id, **_: runtime.sent.append(job_id)
    return runtime


@pytest.fixture(scope="module")
def adapter_files(tiny_folders, tmp_path_factory):
    from helpers.models import randomize_adapter

    from shared.krona import KronaConfig, adapter_state_dict, inject_adapter, save_adapter
    from shared.models import load_pipeline

    files, folder = {}, tmp_path_factory.mktemp("joining-adapters")
    for name, config in (("good", KronaConfig()), ("other_shape", KronaConfig(a1=8, a2=8))):
        pipe = load_pipeline(tiny_folders["tiny-sd"])
        inject_adapter(pipe.unet, config)
        randomize_adapter(pipe.unet, seed=11, std=0.2)
        files[name] = save_adapter(folder / f"{name}.safetensors", adapter_state_dict(pipe.unet), config).read_bytes()
    return files


def _tenant(rt, **limits) -> str:
    from shared.db import Tenant
    from shared.tenants import create_tenant

    with rt.sessions() as session:
        tenant, _ = create_tenant(session, f"join-{uuid.uuid4().hex[:8]}")
        session.commit()
        session.get(Tenant, tenant.id).limits = limits
        session.commit()
        return tenant.id


def _adapter(rt, tenant_id: str, data: bytes) -> str:
    from shared.db import new_id

    adapter_id = new_id("adp")
    key = f"tenants/{tenant_id}/adapters/{adapter_id}.safetensors"
    rt.storage.put_bytes(key, data)
    with rt.sessions() as session:
        session.add(Adapter(id=adapter_id, tenant_id=tenant_id, base_model="tiny-sd", config={}, num_parameters=1,
                            size_bytes=len(data), sha256="0" * 64, storage_key=key))  # fmt: skip
        session.commit()
    return adapter_id


def _submit(rt, tenant_id: str, *, steps: int = 3, size: int = 64, seed: int = 0, **fields) -> str:
    """A queued generation, added as the gateway adds it (the tenant lifted first)."""
    from shared.db import new_id
    from shared.scheduler import generation_cost, lift_on_submit

    with rt.sessions() as session:
        lift_on_submit(session, Generation, tenant_id)
        job_id = new_id("gen")
        images = fields.get("num_images", 1)
        session.add(Generation(id=job_id, tenant_id=tenant_id, prompt=PROMPT, width=size, height=size, steps=steps,
                               seed=seed, guidance_scale=5.0, cost=generation_cost(size, size, steps, images),
                               **fields))  # fmt: skip
        session.commit()
    return job_id


def _row(rt, job_id: str) -> Generation:
    with rt.sessions() as session:
        row = session.get(Generation, job_id)
        session.expunge(row)
        return row


def _pixels(rt, job_id: str) -> np.ndarray:
    """The generation's stored images, as integers."""
    from PIL import Image

    images = _row(rt, job_id).images
    return np.stack([np.asarray(Image.open(io.BytesIO(rt.storage.get_bytes(i["key"])))) for i in images]).astype(int)


def run_generation_job_(rt, job_id: str) -> str:
    from workers.inference.job import run_generation_job

    return run_generation_job(rt, job_id)


@pytest.fixture
def between_steps(monkeypatch):
    """``hooks[k]()`` runs once, inside the loop's k-th step (counted from 0, before its UNet batch: what arrives
    there joins before step k + 1); each step's members (job ids) are recorded."""
    from workers.inference.loop import DenoisingLoop

    hooks: dict = {}
    steps: list[list[str]] = []
    original = DenoisingLoop.step

    def step(self):
        hook = hooks.pop(len(steps), None)
        if hook is not None:
            hook()
        steps.append([d.key for d in self.active])
        return original(self)

    monkeypatch.setattr(DenoisingLoop, "step", step)
    return hooks, steps


def test_a_request_arriving_mid_loop_joins_it_and_gets_its_images_alone(rt, adapter_files, between_steps):
    from PIL import Image

    from shared.images import to_uint8
    from workers.inference.engine import Request
    from workers.inference.job import engine_for
    from workers.inference.loop import DenoisingLoop

    hooks, steps = between_steps
    tenant = _tenant(rt)
    adapter = _adapter(rt, tenant, adapter_files["good"])
    bad = _adapter(rt, tenant, adapter_files["other_shape"])
    first = _submit(rt, tenant, steps=5, seed=1)
    late: dict[str, str] = {}

    def arrive():
        late["joiner"] = _submit(rt, tenant, steps=3, seed=7, adapter_id=adapter, num_images=2, negative_prompt="x")
        late["bad"] = _submit(rt, tenant, steps=3, seed=8, adapter_id=bad)

    hooks[2] = arrive
    assert run_generation_job_(rt, first) == "succeeded"
    # It arrived during step 2, joined before step 3, ran with the first request, and went on alone after it.
    joiner_id = late["joiner"]
    assert steps == [[first], [first], [first], [first, joiner_id], [first, joiner_id], [joiner_id]]
    assert run_generation_job_(rt, late["joiner"]) == "skipped"  # its message finds nothing left to do
    joiner, failed = _row(rt, late["joiner"]), _row(rt, late["bad"])
    assert _row(rt, first).status == "succeeded" and joiner.status == "succeeded" and joiner.attempts == 1
    assert failed.status == "failed" and failed.error_code == "adapter_unsupported"
    # Its images are what it gets alone with the same seed (PNG: 8 bits).
    alone = DenoisingLoop(engine_for(rt), width=64, height=64)
    alone.join("alone", Request(PROMPT, adapter_id=adapter, negative_prompt="x", num_images=2, seed=7), steps=3,
               guidance_scale=5.0)  # fmt: skip
    finished = []
    while alone.active:
        finished += alone.step()
    expected = alone.decode(finished[0])
    stored = [np.asarray(Image.open(io.BytesIO(rt.storage.get_bytes(image["key"])))) for image in joiner.images]
    assert [image["seed"] for image in joiner.images] == [7, 8]
    for got, want in zip(stored, expected, strict=True):
        assert np.abs(got.astype(int) - to_uint8(want).astype(int)).max() <= 1  # float noise may round apart
    with rt.sessions() as session:
        records = {r.job_id: r for r in session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant))}
    assert set(records) == {first, late["joiner"], late["bad"]}
    assert records[late["joiner"]].images == 2 and records[late["joiner"]].steps == 3
    assert records[first].worker_seconds > 0 and records[late["joiner"]].worker_seconds > 0
    assert records[late["bad"]].status == "failed"


def test_the_fair_pick_joins_first_and_a_capped_tenant_stays_capped(rt, between_steps):
    """Tenant A (capped at 2 running) floods the queue; B's request arrives mid-loop and joins at the next step,
    ahead of A's older ones; A never has more than 2 requests in the loop."""
    hooks, steps = between_steps
    a, b = _tenant(rt, max_running_jobs=2), _tenant(rt)
    flood = [_submit(rt, a, steps=2, seed=i) for i in range(5)]
    late = {}
    hooks[1] = lambda: late.setdefault("b", _submit(rt, b, steps=2, seed=9))
    assert run_generation_job_(rt, flood[0]) == "succeeded"
    rows = {job_id: _row(rt, job_id) for job_id in [*flood, late["b"]]}
    assert all(row.status == "succeeded" for row in rows.values())
    for members in steps:
        assert sum(job_id in flood for job_id in members) <= 2, members
    # B joined at the step after it arrived, while A's queued requests waited for the cap.
    joined = {job_id: next(k for k, members in enumerate(steps) if job_id in members) for job_id in rows}
    assert joined[late["b"]] == 2
    assert all(joined[job_id] >= 2 for job_id in flood[2:])


def test_a_request_of_another_size_runs_in_a_loop_of_its_own_beside_the_first(rt, adapter_files, between_steps):
    """A 96x96 request (the fairest) and a 64x64 one arrive while a 64x64 loop runs: the 64x64 one joins that
    loop, the 96x96 one starts a loop of its own at once (no waiting for the first to end); the loops take turns,
    a step each, and every request gets the images it gets alone."""
    hooks, steps = between_steps
    tenant = _tenant(rt)
    adapter = _adapter(rt, tenant, adapter_files["good"])
    first = _submit(rt, tenant, steps=4, adapter_id=adapter)
    late = {}

    def arrive():
        late["other_size"] = _submit(rt, tenant, steps=3, size=96, seed=5, adapter_id=adapter)
        late["same_size"] = _submit(rt, tenant, steps=2, seed=7)

    hooks[1] = arrive
    assert run_generation_job_(rt, first) == "succeeded"
    # Steps 0 and 1: the first alone; then the 64x64 loop [first, same_size] and the 96x96 loop take turns until
    # the 64x64 requests are done (4 and 2 steps), and the 96x96 one takes its third step alone.
    assert steps[:2] == [[first], [first]]
    assert steps[2:6] == [[first, late["same_size"]], [late["other_size"]]] * 2
    assert steps[6:] == [[late["other_size"]]]
    rows = {job_id: _row(rt, job_id) for job_id in [first, *late.values()]}
    assert all(row.status == "succeeded" for row in rows.values())
    # The same images as alone: run each again by itself (a fresh loop, the same seed).
    for job_id, row in rows.items():
        again = _submit(rt, tenant, steps=row.steps, size=row.width, seed=row.seed, adapter_id=row.adapter_id)
        steps.clear()
        assert run_generation_job_(rt, again) == "succeeded" and all(members == [again] for members in steps)
        assert np.abs(_pixels(rt, again) - _pixels(rt, job_id)).max() <= 1  # float noise may round apart


def test_drain_lets_the_running_requests_finish_and_takes_no_new_one(rt, between_steps):
    from workers.drain import request_drain, reset_drain

    hooks, steps = between_steps
    tenant = _tenant(rt)
    first = _submit(rt, tenant, steps=4, num_images=2)
    late = {}

    def sigterm():
        request_drain("test")
        late["after"] = _submit(rt, tenant, steps=2)

    hooks[1] = sigterm
    try:
        assert run_generation_job_(rt, first) == "succeeded"
    finally:
        reset_drain()
    done, untouched = _row(rt, first), _row(rt, late["after"])
    assert done.status == "succeeded" and [image["index"] for image in done.images] == [0, 1]
    assert untouched.status == "queued" and untouched.attempts == 0
    assert len(steps) == 4


def test_a_canceled_request_leaves_the_loop_and_the_others_go_on(rt, between_steps, monkeypatch):
    from workers.inference import job

    monkeypatch.setattr(job, "CANCEL_CHECK_SECONDS", 0.0)
    hooks, steps = between_steps
    tenant = _tenant(rt)
    keep, cancel = _submit(rt, tenant, steps=4), _submit(rt, tenant, steps=6)

    def ask_cancel():
        with rt.sessions() as session:
            session.execute(update(Generation).where(Generation.id == cancel).values(cancel_requested=True))
            session.commit()

    hooks[1] = ask_cancel
    assert run_generation_job_(rt, keep) == "succeeded"
    assert steps[1] == [keep, cancel] and steps[2] == [keep]
    assert _row(rt, keep).status == "succeeded" and _row(rt, cancel).status == "canceled"
    with rt.sessions() as session:
        record = session.scalars(select(UsageRecord).where(UsageRecord.job_id == cancel)).one()
    assert record.status == "canceled" and record.worker_seconds > 0

"""The scheduler's pick at platform scale (issue 24, item 3): it starts from the waiting tenants in fair order and
reads only the first ones' oldest job, so what it reads does not grow with the queue. These tests check that it
still picks exactly what the definition says (shared/scheduler.py: the oldest matching queued job of the tenant
with the smallest counter, below its running cap), against a brute-force reading of every row, on PostgreSQL and
SQLite, through every path: the first window, the running-cap walk past it, filters that send it to the jobs' side,
skipped tenants, tenants without a counter, the train queue's two models, and counters out of step with the jobs.
benchmarks/scheduler_scale.py measures the time; tests never assert times, only how many statements a pick runs."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, event, func, select, update

from shared.db import (
    Adapter,
    Evaluation,
    Generation,
    Tenant,
    TenantService,
    Training,
    make_engine,
    make_session_factory,
    new_id,
    upgrade_to_head,
)
from shared.scheduler import MODELS_OF_QUEUE, QUEUE_OF, QUEUED_COLUMN, charge, pick
from shared.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def db(request, tmp_path_factory):
    """(session factory, settings) on a database of this module's own, so that every row is the test's."""
    from helpers.services import fresh_postgres_database

    tmp = tmp_path_factory.mktemp("scale")
    if request.param == "postgresql":
        with fresh_postgres_database("krona_scale") as url:
            engine = make_engine(url)
            yield make_session_factory(engine), Settings(database_url=url, data_dir=tmp)
            engine.dispose()
    else:
        url = f"sqlite:///{tmp / 'scale.db'}"
        upgrade_to_head(url)
        engine = make_engine(url)
        yield make_session_factory(engine), Settings(database_url=url, data_dir=tmp)
        engine.dispose()


def _clear(sessions) -> None:
    with sessions() as session:
        for model in (Generation, Evaluation, Training, Adapter, TenantService, Tenant):
            session.execute(delete(model))
        session.commit()


def _sync_counters(session) -> None:
    """Set the tenants' queued counters to their queued rows, as the triggers keep them (so that the test does not
    depend on the triggers of whatever migration is newest)."""
    for model, column in QUEUED_COLUMN.items():
        queued = (
            select(func.count())
            .select_from(model)
            .where(model.tenant_id == Tenant.id, model.status == "queued")
            .scalar_subquery()
        )
        session.execute(update(Tenant).values({column.key: queued}))


def _job(model, tenant_id: str, status: str, created: datetime, rng: random.Random, adapter_id: str | None, size: int):
    common = {"tenant_id": tenant_id, "status": status, "created_at": created, "cost": float(rng.choice([1, 4, 9]))}
    if status == "queued":
        common["attempts"] = rng.choice([0, 0, 0, 1, 3])  # 3: out of attempts, never claimable
    if model is Generation:
        return Generation(id=new_id("gen"), prompt="p", width=size, height=size, steps=rng.choice([10, 20]), seed=0,
                          **common)  # fmt: skip
    if model is Training:
        return Training(id=new_id("trn"), base_model="tiny-sd", instance_prompt="p", image_keys=[], total_steps=10,
                        **common)  # fmt: skip
    return Evaluation(id=new_id("evl"), adapter_id=adapter_id, base_model="tiny-sd", params={}, reference_keys=[],
                      **common)  # fmt: skip


def _scenario(sessions, rng: random.Random, queue: str, tenants: int) -> list[str]:
    """Tenants with random counters (ties on purpose), some without a counter, random caps, running and queued
    jobs of the queue's models with random sizes, ages and attempts."""
    models = MODELS_OF_QUEUE[queue]
    ids = []
    with sessions() as session:
        for i in range(tenants):
            tenant = Tenant(id=new_id("ten"), name=f"scale-{i}-{rng.randrange(10**9)}", webhook_secret="s" * 32,
                            weight=rng.choice([1.0, 2.0]),
                            limits={"max_running_jobs": rng.choice([0, 0, 1, 2])})  # fmt: skip
            session.add(tenant)
            ids.append(tenant.id)
        session.flush()
        adapters = {}
        if Evaluation in models:
            for tenant_id in ids:
                adapters[tenant_id] = new_id("adp")
                session.add(Adapter(id=adapters[tenant_id], tenant_id=tenant_id, base_model="tiny-sd", config={},
                                    num_parameters=1, size_bytes=1, sha256="0" * 64, storage_key="k"))  # fmt: skip
        for tenant_id in ids:
            if rng.random() < 0.85:  # the others have no counter (jobs added without lift_on_submit)
                session.add(TenantService(tenant_id=tenant_id, queue=queue, counter=float(rng.choice([0, 5, 5, 10])),
                                          updated_at=T0 + timedelta(seconds=rng.randrange(1000))))  # fmt: skip
            sizes = rng.choice([[64], [128], [64, 128]])  # many tenants have one size only: the filters bite
            for _ in range(rng.choice([0, 1, 2, 6])):
                created = T0 + timedelta(seconds=rng.randrange(10**6))
                status = rng.choice(["queued", "queued", "queued", "running", "succeeded"])
                model = rng.choice(models)
                job = _job(model, tenant_id, status, created, rng, adapters.get(tenant_id), rng.choice(sizes))
                session.add(job)
        session.flush()
        _sync_counters(session)
        session.commit()
    return ids


def _expected(session, models: tuple, settings: Settings, filters, skip: frozenset[str]):
    """The definition, read from every row: (job id, tenant id, model) or None."""
    from shared.limits import tenant_limits

    queue = QUEUE_OF[models[0]]
    counters = {
        row.tenant_id: (row.counter, row.updated_at)
        for row in session.execute(select(TenantService).where(TenantService.queue == queue)).scalars()
    }
    best = None
    for tenant in session.execute(select(Tenant)).scalars():
        if tenant.id in skip:
            continue
        cap = tenant_limits(settings, tenant.limits).max_running_jobs
        running = sum(
            session.scalar(select(func.count()).where(m.tenant_id == tenant.id, m.status == "running")) for m in models
        )
        if cap > 0 and running >= cap:
            continue
        jobs = [
            (job.created_at, job.id, model)
            for model in models
            for job in session.execute(
                select(model).where(model.tenant_id == tenant.id, model.status == "queued", *filters(model))
            ).scalars()
        ]
        if not jobs:
            continue
        counter, updated = counters.get(tenant.id, (None, None))
        # No counter: first of all; then the smallest counter, the one that reached it first, the id.
        key = (counter is not None, counter or 0.0, _naive(updated), tenant.id)
        oldest = min(jobs, key=lambda j: (_naive(j[0]), j[1]))
        if best is None or key < best[0]:
            best = (key, oldest[1], tenant.id, oldest[2])
    return None if best is None else best[1:]


def _naive(moment: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes, PostgreSQL aware ones; compare both as UTC."""
    return None if moment is None else moment.replace(tzinfo=None)


def _filters_for(rng: random.Random):
    from workers.lease import MAX_ATTEMPTS

    size = rng.choice([None, 64, 128, 256])  # 256: matches nothing

    def filters(model):
        conditions = [model.attempts < MAX_ATTEMPTS]
        if model is Generation and size is not None:
            conditions += [Generation.width == size, Generation.height == size]
        return tuple(conditions)

    return filters


@pytest.mark.parametrize("queue", ["infer", "train"])
def test_pick_is_the_definition_on_random_queues(db, queue):
    sessions, settings = db
    models = MODELS_OF_QUEUE[queue]
    rng = random.Random(f"scale-{queue}")
    for _ in range(12):
        _clear(sessions)
        ids = _scenario(sessions, rng, queue, tenants=rng.choice([3, 9, 40]))
        for _ in range(4):
            filters = _filters_for(rng)
            skip = frozenset(rng.sample(ids, k=rng.choice([0, 0, 1, 3])))
            with sessions() as session:
                expected = _expected(session, models, settings, filters, skip)
                got = pick(session, models, settings, filters=filters, skip_tenants=skip)
            assert (None if got is None else (got.job_id, got.tenant_id, got.model)) == expected


def test_running_caps_ahead_are_walked_past_the_first_window(db):
    """Ten tenants with the smallest counters are at their cap: the pick reads on, past the first window."""
    sessions, settings = db
    _clear(sessions)
    with sessions() as session:
        ids = []
        for i in range(14):
            tenant = Tenant(id=new_id("ten"), name=f"cap-{i}", webhook_secret="s" * 32,
                            limits={"max_running_jobs": 1 if i < 10 else 0})  # fmt: skip
            session.add(tenant)
            ids.append(tenant.id)
        session.flush()
        for i, tenant_id in enumerate(ids):
            session.add(TenantService(tenant_id=tenant_id, queue="infer", counter=float(i), updated_at=T0))
            for status in ("running", "queued") if i < 10 else ("queued",):
                session.add(Generation(id=new_id("gen"), tenant_id=tenant_id, prompt="p", width=64, height=64,
                                       seed=0, status=status, created_at=T0))  # fmt: skip
        session.flush()
        _sync_counters(session)
        session.commit()
        assert pick(session, Generation, settings).tenant_id == ids[10]


def test_a_filter_the_first_tenants_cannot_meet_is_answered_from_the_jobs_side(db):
    """The gatherer's filters: the 30 fairest tenants only have 64x64 jobs; the pick for 128x128 finds the
    fairest tenant that has one, and one whose only 128x128 job is out of attempts does not count."""
    sessions, settings = db
    _clear(sessions)
    with sessions() as session:
        ids = []
        for i in range(40):
            tenant = Tenant(id=new_id("ten"), name=f"size-{i}", webhook_secret="s" * 32)
            session.add(tenant)
            ids.append(tenant.id)
        session.flush()
        for i, tenant_id in enumerate(ids):
            session.add(TenantService(tenant_id=tenant_id, queue="infer", counter=float(i), updated_at=T0))
            size = 64 if i < 30 else 128
            attempts = 3 if i == 30 else 0
            session.add(Generation(id=new_id("gen"), tenant_id=tenant_id, prompt="p", width=size, height=size,
                                   seed=0, attempts=attempts, created_at=T0))  # fmt: skip
        session.flush()
        _sync_counters(session)
        session.commit()
        filters = lambda m: (m.attempts < 3, m.width == 128, m.height == 128)  # noqa: E731
        assert pick(session, Generation, settings, filters=filters).tenant_id == ids[31]
        assert pick(session, Generation, settings, filters=lambda m: (m.width == 256,)) is None


def test_counters_out_of_step_slow_the_pick_but_do_not_stop_the_queue(db):
    """If the queued counters said nobody waits while jobs are queued (a migration that lost the triggers), the
    pick still finds the jobs from their side."""
    sessions, settings = db
    _clear(sessions)
    with sessions() as session:
        tenant = Tenant(id=new_id("ten"), name="out-of-step", webhook_secret="s" * 32)
        session.add(tenant)
        session.flush()
        job = Generation(id=new_id("gen"), tenant_id=tenant.id, prompt="p", width=64, height=64, seed=0)
        session.add(job)
        session.commit()
        session.execute(update(Tenant).values(queued_generations=0))
        session.commit()
        assert pick(session, Generation, settings).job_id == job.id


def test_a_tenant_without_a_counter_is_charged_from_the_floor(db):
    """Jobs added without lift_on_submit: the tenant goes first once, and its first charge puts it level with the
    waiting tenants (the floor plus the job's cost), not at 0 with a whole backlog of credit."""
    sessions, settings = db
    _clear(sessions)
    with sessions() as session:
        waiting, newcomer = (Tenant(id=new_id("ten"), name=n, webhook_secret="s" * 32) for n in ("w", "n"))
        session.add_all([waiting, newcomer])
        session.flush()
        session.add(TenantService(tenant_id=waiting.id, queue="infer", counter=100.0, updated_at=T0))
        for tenant in (waiting, newcomer):
            session.add(Generation(id=new_id("gen"), tenant_id=tenant.id, prompt="p", width=64, height=64, seed=0))
        session.commit()
        candidate = pick(session, Generation, settings)
        assert candidate.tenant_id == newcomer.id
        charge(session, Generation, newcomer.id, 7.0, 1.0)
        session.commit()
        assert session.get(TenantService, (newcomer.id, "infer")).counter == pytest.approx(107.0)


def test_what_a_pick_runs_does_not_grow_with_the_queue(db):
    """One statement (the first waiting tenants in fair order, with their oldest matching jobs) whether 5 or 200
    tenants wait with 1 or 20 jobs each, and the same for the gatherer's filtered pick when the first tenant has a
    compatible job; none of them reads every queued job (each has a LIMIT, or is keyed by a tenant)."""
    sessions, settings = db
    engine = sessions.kw["bind"]
    for tenants, per in ((5, 1), (200, 20)):
        _clear(sessions)
        with sessions() as session:
            for i in range(tenants):
                tenant = Tenant(id=new_id("ten"), name=f"grow-{i}", webhook_secret="s" * 32)
                session.add(tenant)
                session.flush()
                session.add(TenantService(tenant_id=tenant.id, queue="infer", counter=float(i), updated_at=T0))
                session.add_all(
                    Generation(id=new_id("gen"), tenant_id=tenant.id, prompt="p", width=64 * (1 + j % 2),
                               height=64 * (1 + j % 2), seed=0, created_at=T0 + timedelta(seconds=j))
                    for j in range(per)
                )  # fmt: skip
            session.flush()
            _sync_counters(session)
            session.commit()
        for filters in ((), (Generation.width == 64, Generation.height == 64)):
            statements: list[str] = []

            def listener(*args, statements=statements) -> None:
                statements.append(args[2])

            event.listen(engine, "before_cursor_execute", listener)
            try:
                with sessions() as session:
                    assert pick(session, Generation, settings, filters=filters) is not None
            finally:
                event.remove(engine, "before_cursor_execute", listener)
            assert len(statements) == 1, statements
            assert all("LIMIT" in s.upper() for s in statements), statements

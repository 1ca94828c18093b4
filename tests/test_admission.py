"""Admission of creates (issue 26): the per-tenant queued counters the database keeps with triggers follow every
way a job enters or leaves ``queued``, on PostgreSQL and SQLite; the cap they enforce is exact; and one tenant's
creates do not wait for each other (no lock on the tenant's row across a create's round trips)."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, func, select, update

from shared.db import Generation, Tenant, Training, make_engine, make_session_factory, upgrade_to_head, utcnow

# Run after the parallel tests, alone (concurrent creates and their connections): `make test`'s second phase (Makefile).
pytestmark = pytest.mark.serial


def _counts(session, tenant_id: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(what the triggers kept, what a count says) of (queued trainings, queued generations)."""
    kept = session.execute(
        select(Tenant.queued_trainings, Tenant.queued_generations).where(Tenant.id == tenant_id)
    ).one()
    counted = tuple(
        session.scalar(select(func.count()).select_from(m).where(m.tenant_id == tenant_id, m.status == "queued"))
        for m in (Training, Generation)
    )
    return tuple(kept), counted


def _training(tenant_id: str, status: str = "queued") -> Training:
    return Training(
        tenant_id=tenant_id, base_model="tiny-sd", instance_prompt="a photo of sks dog", status=status,
        image_keys=["a", "b"], total_steps=10,
    )  # fmt: skip


def _generation(tenant_id: str, prompt: str = "p", status: str = "queued") -> Generation:
    return Generation(tenant_id=tenant_id, prompt=prompt, status=status, width=64, height=64, seed=0)


def _exercise_every_transition(sessions) -> None:
    """Jobs inserted queued and not, claimed, canceled, finished, deleted, re-queued; after each step the kept
    counters equal the counts. Then a queued job over the cap is refused and the counters do not move."""
    from shared.tenants import create_tenant
    from workers.lease import claim, finish

    with sessions() as session:
        tenant, _ = create_tenant(session, f"counted-{uuid.uuid4().hex[:6]}")
        other, _ = create_tenant(session, f"other-{uuid.uuid4().hex[:6]}")
        session.commit()
        tenant_id, other_id = tenant.id, other.id

    def check(expected: tuple[int, int]) -> None:
        with sessions() as session:
            kept, counted = _counts(session, tenant_id)
            assert kept == counted == expected
            assert _counts(session, other_id)[0] == (0, 0)

    with sessions() as session:  # a batch of generations, two trainings, and rows that never were queued
        session.add_all([_generation(tenant_id, f"p{i}") for i in range(5)])
        session.add_all([_training(tenant_id), _training(tenant_id), _training(tenant_id, "succeeded")])
        session.add(_generation(tenant_id, "done", "failed"))
        session.commit()
    check((2, 5))
    with sessions() as session:
        mine = (Generation.tenant_id == tenant_id, Generation.status == "queued")
        gen_ids = list(session.scalars(select(Generation.id).where(*mine).order_by(Generation.id)))
        trn_id = session.scalar(select(Training.id).where(Training.tenant_id == tenant_id, Training.status == "queued"))
    with sessions() as session:  # a worker claims one of each
        assert claim(session, Generation, gen_ids[0], "w1", 60)
        assert claim(session, Training, trn_id, "w1", 60)
    check((1, 4))
    with sessions() as session:  # the claimed ones end; ending does not count twice
        assert finish(session, Generation, gen_ids[0], "w1", "succeeded")
        assert finish(session, Training, trn_id, "w1", "failed")
    check((1, 4))
    with sessions() as session:  # a cancel of a queued job, and progress writes that do not touch status
        session.execute(update(Generation).where(Generation.id == gen_ids[1]).values(status="canceled"))
        session.execute(update(Generation).where(Generation.id == gen_ids[2]).values(updated_at=utcnow()))
        session.commit()
    check((1, 3))
    with sessions() as session:  # deleted while queued; an ended row deleted changes nothing
        session.execute(delete(Generation).where(Generation.id == gen_ids[2]))
        session.execute(delete(Generation).where(Generation.id == gen_ids[0]))
        session.commit()
    check((1, 2))
    with sessions() as session:  # back to queued (no path does this today; the counter still follows)
        session.execute(update(Generation).where(Generation.id == gen_ids[1]).values(status="queued"))
        session.commit()
    check((1, 3))
    with sessions() as session:  # inserted and claimed in one transaction: counted once, then not
        row = _generation(tenant_id, "quick")
        session.add(row)
        session.flush()
        session.execute(update(Generation).where(Generation.id == row.id).values(status="running"))
        session.commit()
    check((1, 3))
    with sessions() as session:  # a rolled-back insert leaves nothing
        session.add(_generation(tenant_id, "never"))
        session.flush()
        session.rollback()
    check((1, 3))

    # The cap: 4 queued jobs now; a cap of 5 takes one more, refuses the sixth, and a refused batch adds none.
    with sessions() as session:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(queued_cap=5))
        session.commit()
    with sessions() as session:
        session.add(_generation(tenant_id, "fits"))
        session.commit()
    check((1, 4))
    for rows in (1, 3):
        with sessions() as session, pytest.raises(Exception, match="krona_queue_full"):
            session.add_all([_generation(tenant_id, "over") for _ in range(rows)])
            session.commit()
    check((1, 4))
    with sessions() as session:  # a job leaving the queue makes room again
        session.execute(update(Generation).where(Generation.id == gen_ids[1]).values(status="canceled"))
        session.add(_generation(tenant_id, "room"))
        session.commit()
    check((1, 4))
    with sessions() as session:  # deleting the tenant (its jobs cascade) works with the triggers in place
        session.execute(delete(Tenant).where(Tenant.id == tenant_id))
        session.commit()
        assert session.get(Tenant, tenant_id) is None


def test_the_counters_follow_every_transition_on_postgresql(postgres_url):
    engine = make_engine(postgres_url)
    try:
        _exercise_every_transition(make_session_factory(engine))
    finally:
        engine.dispose()


def test_the_counters_follow_every_transition_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'krona.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    try:
        _exercise_every_transition(make_session_factory(engine))
    finally:
        engine.dispose()


def test_the_migration_counts_the_jobs_already_queued(tmp_path):
    """Upgrading a database that has queued jobs (0006 -> 0007) starts the counters at the right values."""
    from alembic import command
    from alembic.config import Config

    from shared.db.session import MIGRATIONS_DIR
    from shared.tenants import create_tenant

    url = f"sqlite:///{tmp_path / 'krona.db'}"
    upgrade_to_head(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        tenant, _ = create_tenant(session, "before")
        session.commit()
        tenant_id = tenant.id
    command.downgrade(config, "0006")
    from sqlalchemy import JSON, column, table

    # The table as code at 0006 knew it (no column added since).
    names = ("id", "tenant_id", "prompt", "status", "created_at", "updated_at", "num_images", "steps",
             "guidance_scale", "adapter_scale", "seed", "attempts", "width", "height")  # fmt: skip
    old_generations = table("generations", *(column(n) for n in names), column("images", JSON))
    with engine.begin() as conn:  # rows written by code at 0006 (no triggers)
        for i, status in enumerate(("queued", "queued", "running", "queued")):
            conn.execute(
                old_generations.insert().values(
                    id=f"gen_{i:024d}", tenant_id=tenant_id, prompt="p", status=status, created_at=utcnow(),
                    num_images=1, steps=20, guidance_scale=7.5, adapter_scale=1.0, seed=0, attempts=0, images=[],
                    width=64, height=64, updated_at=utcnow(),
                )
            )  # fmt: skip
    command.upgrade(config, "head")
    with sessions() as session:
        assert _counts(session, tenant_id) == ((0, 3), (0, 3))
    engine.dispose()


def test_one_tenants_creates_do_not_wait_for_each_other(api, monkeypatch):
    """A create paused just before its commit holds no lock that another create of the same tenant needs:
    the second is answered while the first still waits (the cap is checked inside the commit)."""
    from services.gateway.services import generations

    paused, release = threading.Event(), threading.Event()
    original = generations.commit_created

    def slow_first_commit(*args, **kwargs):
        if not paused.is_set():
            paused.set()
            assert release.wait(timeout=120)
        return original(*args, **kwargs)

    monkeypatch.setattr(generations, "commit_created", slow_first_commit)

    def create(prompt: str) -> int:
        return api.client.post("/v1/generations", headers=api.headers(), json={"prompt": prompt}).status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(create, "first")
        assert paused.wait(timeout=120), "the first create never reached its commit"
        second = pool.submit(create, "second")
        try:
            # Waits on progress, not on a budget: the second create either finishes or is blocked by the first.
            assert second.result(timeout=120) == 202
            assert not first.done()
        finally:
            release.set()
        assert first.result(timeout=120) == 202


def test_the_stored_cap_follows_the_tenants_limits(api):
    """The effective cap (override, else the setting) is written to the tenant's row at its next create, so an
    admin's change applies at once, and 0 (no cap) clears it."""
    from helpers.api import set_tenant_limits as _set

    tenant_id = _set(api, max_queued_jobs=2)
    assert api.client.post("/v1/generations", headers=api.headers(), json={"prompt": "a"}).status_code == 202
    with api.context.sessions() as session:
        assert session.scalar(select(Tenant.queued_cap).where(Tenant.id == tenant_id)) == 2
    two = {"generations": [{"prompt": "b"}, {"prompt": "c"}]}
    refused = api.client.post("/v1/batches", headers=api.headers(), json=two)
    assert refused.status_code == 429 and refused.json()["error"]["details"] == {
        "queued": 1,
        "limit": 2,
        "requested": 2,
    }
    _set(api, max_queued_jobs=0)
    assert api.client.post("/v1/batches", headers=api.headers(), json=two).status_code == 202
    with api.context.sessions() as session:
        assert session.scalar(select(Tenant.queued_cap).where(Tenant.id == tenant_id)) is None
        assert _counts(session, tenant_id) == ((0, 3), (0, 3))


def _triggers(engine) -> set[str]:
    from sqlalchemy import text

    query = (
        "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        if engine.dialect.name == "postgresql"
        else "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    )
    with engine.connect() as conn:
        return {name for (name,) in conn.execute(text(query)) if name.startswith("krona_")}


def test_every_counter_trigger_survives_the_migrations_down_and_up(tmp_path, postgres_url):
    """A migration that rebuilds a SQLite table (Alembic's batch mode) drops its triggers, and the queued counters
    would silently stop counting: every job table keeps its triggers at the head, and after going down and up."""
    from alembic import command
    from alembic.config import Config

    from shared.db.session import MIGRATIONS_DIR

    sqlite = {f"krona_{t}_queued_{e}" for t in ("trainings", "generations", "evaluations")
              for e in ("insert", "leave", "enter", "delete")}  # fmt: skip
    postgres = {f"krona_{t}_queued_{e}" for t in ("trainings", "generations", "evaluations")
                for e in ("insert", "update", "delete")}  # fmt: skip
    url = f"sqlite:///{tmp_path / 'krona.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    assert _triggers(engine) == sqlite
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.downgrade(config, "0008")
    assert _triggers(engine) == sqlite
    command.upgrade(config, "head")
    assert _triggers(engine) == sqlite
    engine.dispose()
    engine = make_engine(postgres_url)
    assert _triggers(engine) == postgres
    engine.dispose()

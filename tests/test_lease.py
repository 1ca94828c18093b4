"""Leases: guarded claims, the heartbeat, and takeover of an expired lease."""

import time
from datetime import timedelta

from sqlalchemy import update

from shared.db import Training, make_engine, make_session_factory, upgrade_to_head, utcnow
from shared.settings import Settings
from shared.tenants import create_tenant
from workers.lease import Heartbeat, claim, finish, renew


def _setup(tmp_path):
    url = Settings(data_dir=tmp_path).resolved_database_url
    upgrade_to_head(url)
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        tenant, _ = create_tenant(session, "leases")
        row = Training(tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="p", image_keys=[], total_steps=1)
        session.add(row)
        session.commit()
        return sessions, row.id


def test_claim_is_exclusive_and_an_expired_lease_can_be_taken_over(tmp_path):
    sessions, job = _setup(tmp_path)
    with sessions() as s:
        assert claim(s, Training, job, "a", 60)
        assert not claim(s, Training, job, "b", 60)  # a holds a live lease
        s.execute(update(Training).where(Training.id == job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
        assert claim(s, Training, job, "b", 60)  # a's lease expired: b takes over
        assert not renew(s, Training, job, "a", 60)  # a finds out at its next write
        assert not finish(s, Training, job, "a", "succeeded")
        assert finish(s, Training, job, "b", "succeeded")
        assert s.get(Training, job).attempts == 2
        assert not claim(s, Training, job, "c", 60)  # terminal


def test_heartbeat_keeps_the_lease_and_notices_a_takeover(tmp_path):
    sessions, job = _setup(tmp_path)
    with sessions() as s:
        assert claim(s, Training, job, "a", 8)
        first = s.get(Training, job).lease_expires_at
    with Heartbeat(sessions, Training, job, "a", 8) as beat:  # beats every 2 s
        time.sleep(2.5)
        with sessions() as s:
            assert s.get(Training, job).lease_expires_at > first
            s.execute(update(Training).where(Training.id == job).values(lease_owner="b"))
            s.commit()
        time.sleep(2.2)
        assert beat.lost

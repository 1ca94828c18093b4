"""Leased jobs: every state change is a guarded UPDATE on the row (the row is the source of truth).

claim      queued -> running, or take over a running job whose lease expired (crashed worker)
claim_next claim the job the fair scheduler picks (shared/scheduler.py) and charge its tenant
renew      extend the lease; False means another worker owns the job now: stop
finish     running -> succeeded/failed/canceled, only by the lease owner
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from shared.db import JobStatus, Tenant, utcnow
from shared.limits import tenant_limits
from shared.scheduler import charge, pick

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "MAX_ATTEMPTS",
    "Heartbeat",
    "claim",
    "claim_next",
    "claim_next_job",
    "finish",
    "renew",
    "wake_if_capped",
    "worker_identity",
]

MAX_ATTEMPTS = 3


def worker_identity() -> str:
    """Unique per process: host, pid and a random part (pids are reused across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def claim(session: Session, model, job_id: str, owner: str, lease_seconds: int, *, commit: bool = True) -> bool:
    """Take the job if it is queued, or running with an expired lease and attempts left; commit; True if taken."""
    now = utcnow()
    result = session.execute(
        update(model)
        .where(
            model.id == job_id,
            model.attempts < MAX_ATTEMPTS,
            or_(
                model.status == JobStatus.QUEUED, and_(model.status == JobStatus.RUNNING, model.lease_expires_at < now)
            ),
        )
        .values(
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=model.attempts + 1,
            started_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if commit:
        session.commit()
    return result.rowcount == 1


def claim_next(session: Session, model, settings: Settings, owner: str, lease_seconds: int, **options) -> str | None:
    """Claim the next job of ``model`` the fair way (shared/scheduler.py) and charge its tenant; its id, or None.
    (``claim_next_job``, which takes the same ``options``, for a queue that serves several models.)"""
    claimed = claim_next_job(session, (model,), settings, owner, lease_seconds, **options)
    return claimed[1] if claimed is not None else None


def claim_next_job(
    session: Session,
    models: Sequence,
    settings: Settings,
    owner: str,
    lease_seconds: int,
    *,
    message_job_id: str | None = None,
    filters: Sequence = (),
    tries: int = 8,
) -> tuple[type, str] | None:
    """Claim the next job among ``models`` (one queue's) the fair way and charge its tenant: (its model, its id),
    or None. ``filters`` apply to every model's rows.

    A message is a wake-up call: it takes the fairest queued job, not necessarily its own. The exception
    is a message for a running job whose lease expired (the reaper's resend after a crash): that job is
    resumed first, so that a crashed job does not wait behind the queue again.
    """
    if message_job_id is not None:
        for model in models:
            expired = session.scalar(
                select(model.id).where(
                    model.id == message_job_id, model.status == JobStatus.RUNNING, model.lease_expires_at < utcnow()
                )
            )
            if expired is not None and claim(session, model, message_job_id, owner, lease_seconds):
                return model, message_job_id
    for _ in range(tries):
        candidate = pick(
            session, tuple(models), settings, filters=lambda model: (model.attempts < MAX_ATTEMPTS, *filters)
        )
        if candidate is None:
            session.rollback()
            return None
        model = candidate.model
        if claim(session, model, candidate.job_id, owner, lease_seconds, commit=False):
            charge(session, model, candidate.tenant_id, candidate.cost, candidate.weight)
            session.commit()
            return model, candidate.job_id
        session.rollback()  # another worker took it first: pick again
    return None


def wake_if_capped(rt, model, task: str, tenant_ids: set[str]) -> int:
    """After jobs of these tenants ended: a tenant with a running-jobs cap may have had queued jobs skipped by
    claims while it was at its cap (their messages spent on other jobs); send one message for its oldest queued
    job, so that it does not wait for the reaper. Returns how many were sent."""
    sent = 0
    for tenant_id in tenant_ids:
        try:
            with rt.sessions() as session:
                tenant = session.get(Tenant, tenant_id)
                if tenant is None or tenant_limits(rt.settings, tenant.limits).max_running_jobs <= 0:
                    continue
                job_id = session.scalar(
                    select(model.id)
                    .where(model.tenant_id == tenant_id, model.status == JobStatus.QUEUED)
                    .order_by(model.created_at)
                    .limit(1)
                )
            if job_id is not None:
                rt.send(task, job_id)
                sent += 1
        except Exception:  # the reaper sends it later
            continue
    return sent


def renew(session: Session, model, job_id: str, owner: str, lease_seconds: int, **values: Any) -> bool:
    """Extend the lease (and write progress ``values``) if this worker still owns the running job."""
    now = utcnow()
    result = session.execute(
        update(model)
        .where(model.id == job_id, model.status == JobStatus.RUNNING, model.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def finish(
    session: Session, model, job_id: str, owner: str, status: str, *, commit: bool = True, **values: Any
) -> bool:
    """Move an owned running job to a terminal ``status``; False if this worker no longer owns it."""
    now = utcnow()
    result = session.execute(
        update(model)
        .where(model.id == job_id, model.status == JobStatus.RUNNING, model.lease_owner == owner)
        .values(status=status, finished_at=now, updated_at=now, lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    if commit:
        session.commit()
    return result.rowcount == 1


class Heartbeat:
    """Renews a job's lease every ``lease_seconds / 4`` from a thread, for phases without progress writes
    (loading the model, generating class images, a long batch). ``lost`` turns True if another worker
    took the job over; the job then stops at its next check."""

    def __init__(self, sessions, model, job_id: str, owner: str, lease_seconds: int) -> None:
        self.lost = False
        self._args = (model, job_id, owner, lease_seconds)
        self._sessions = sessions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        model, job_id, owner, lease_seconds = self._args
        while not self._stop.wait(lease_seconds / 4):
            try:
                with self._sessions() as session:
                    if not renew(session, model, job_id, owner, lease_seconds):
                        self.lost = True
                        return
            except Exception:  # a database hiccup: try again at the next beat
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

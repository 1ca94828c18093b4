"""The reaper: what makes a crash safe on every broker.

- running jobs whose lease expired (their worker died): sent again, so a live worker claims and resumes
  them; after MAX_ATTEMPTS claims they are marked failed;
- queued jobs never sent (broker down at creation), or, while no worker of their queue holds a job, sent
  long ago without a claim: sent again;
- adapter evaluations queued and not sent for a grace period, or running with an expired lease: sent again;
- webhook deliveries that are due but were not sent (a lost message, a crashed webhook worker): sent
  again; a delivery whose last allowed attempt's lease expired is given up;
- every KRONA_RETENTION_INTERVAL_SECONDS, a retention pass (workers/retention.py) in a thread of its own,
  so that a long storage sweep never delays the requeues.

Every action is idempotent (claims are guarded updates), so several reapers may run at once.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import or_, select, update

from shared.db import Evaluation, Generation, JobStatus, Training, WebhookState, utcnow
from shared.queue import EVALUATE_TASK, GENERATE_TASK, TRAIN_TASK, WEBHOOK_TASK
from shared.scheduler import MODELS_OF_QUEUE, QUEUE_OF

from .lease import MAX_ATTEMPTS
from .retention import run_retention
from .runtime import Runtime
from .webhooks import due_condition

log = logging.getLogger("krona.worker.reaper")

__all__ = ["reap_once", "start_retention_if_due"]


# Each job model, the task that wakes a worker for it, and its webhook kind (evaluations have no webhooks).
JOBS = (
    (Training, TRAIN_TASK, "training"),
    (Evaluation, EVALUATE_TASK, None),
    (Generation, GENERATE_TASK, "generation"),
)


def reap_once(rt: Runtime) -> dict[str, int]:
    now = utcnow()
    grace = timedelta(seconds=rt.settings.enqueue_grace_seconds)
    counts = {"requeued": 0, JobStatus.FAILED: 0, "webhooks": 0}
    for model, task, kind in JOBS:
        with rt.sessions() as session:
            expired = session.scalars(
                select(model).where(model.status == JobStatus.RUNNING, model.lease_expires_at < now)
            ).all()
            for row in expired:
                if row.attempts >= MAX_ATTEMPTS:
                    result = session.execute(
                        update(model)
                        .where(model.id == row.id, model.status == JobStatus.RUNNING, model.lease_expires_at < now)
                        .values(
                            status=JobStatus.FAILED,
                            finished_at=now,
                            updated_at=now,
                            error_code="worker_lost",
                            error_message=f"the worker running this job stopped {row.attempts} times",
                            lease_owner=None,
                        )
                    )
                    session.commit()
                    counts[JobStatus.FAILED] += result.rowcount
                    if result.rowcount and model is Evaluation:
                        _delete_references(rt, session, row.id)
                    continue
                _send(rt, session, model, task, row.id)
                counts["requeued"] += 1
            # A message wakes a worker, which claims the fairest job of its queue, not necessarily the message's
            # own: while a worker of this queue holds a live lease, messages are being consumed and a long-queued
            # job is only waiting its turn. Only jobs never sent (broker down at creation) are sent then; when no
            # worker holds a job, the jobs queued longer than the grace are sent again (their messages may be lost).
            busy = any(
                session.scalar(select(m.id).where(m.status == JobStatus.RUNNING, m.lease_expires_at >= now).limit(1))
                for m in MODELS_OF_QUEUE[QUEUE_OF[model]]
            )
            unsent = model.enqueued_at.is_(None)
            stale = session.scalars(
                select(model.id).where(
                    model.status == JobStatus.QUEUED, unsent if busy else or_(unsent, model.enqueued_at < now - grace)
                )
            ).all()
            for job_id in stale:
                _send(rt, session, model, task, job_id)
                counts["requeued"] += 1
            if kind is not None:
                counts["webhooks"] += _reap_webhooks(rt, session, model, kind, now)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    start_retention_if_due(rt)
    return counts


def _delete_references(rt: Runtime, session, evaluation_id: str) -> None:
    """The reference photos of an evaluation the reaper gave up on (the sweep takes what fails here)."""
    keys = session.scalar(select(Evaluation.reference_keys).where(Evaluation.id == evaluation_id)) or []
    session.execute(update(Evaluation).where(Evaluation.id == evaluation_id).values(reference_keys=[]))
    session.commit()
    for key in keys:
        try:
            rt.storage.delete(key)
        except Exception:
            log.warning("could not delete evaluation image %s; the storage sweep will", key)


# This process's last retention pass (time.monotonic()), and the lock its one running pass holds.
_last_retention: float | None = None
_retention_running = threading.Lock()


def start_retention_if_due(rt: Runtime) -> threading.Thread | None:
    """Start a retention pass in a thread when none ran in the last KRONA_RETENTION_INTERVAL_SECONDS and none is
    running; the thread, or None. A failed pass is logged and waits for the next interval like any other."""
    global _last_retention
    now = time.monotonic()
    if _last_retention is not None and now - _last_retention < rt.settings.retention_interval_seconds:
        return None
    if not _retention_running.acquire(blocking=False):
        return None
    _last_retention = now
    thread = threading.Thread(target=_retention_pass, args=(rt,), name="krona-retention", daemon=True)
    thread.start()
    return thread


def _retention_pass(rt: Runtime) -> None:
    try:
        counts = run_retention(rt)
        if counts["errors"] or counts["trainings_purged"] or counts["generations_expired"]:
            log.info("retention: %s", counts)
    except Exception:  # never fatal: the next interval tries again
        log.exception("retention pass failed")
    finally:
        _retention_running.release()


def _send(rt: Runtime, session, model, task: str, job_id: str) -> None:
    try:
        rt.send(task, job_id)
    except Exception:
        log.warning("reaper could not enqueue %s %s", task, job_id)
        return
    session.execute(update(model).where(model.id == job_id).values(enqueued_at=utcnow()))
    session.commit()


# A delivery's own message normally claims it; the reaper steps in only once it is this late.
WEBHOOK_REAP_AFTER = timedelta(seconds=30)


def _reap_webhooks(rt: Runtime, session, model, kind: str, now) -> int:
    """Send overdue deliveries; give up those whose last attempt's claim expired. Returns how many were sent."""
    max_attempts = rt.settings.webhook_max_attempts
    session.execute(
        update(model)
        .where(
            model.webhook_state == WebhookState.SENDING,
            model.webhook_lease_expires_at < now,
            model.webhook_attempts >= max_attempts,
        )
        .values(
            webhook_state=WebhookState.GIVEN_UP,
            webhook_lease_expires_at=None,
            webhook_last_error="the delivering worker stopped",
        )
    )
    session.commit()
    late = now - WEBHOOK_REAP_AFTER
    overdue = session.scalars(
        select(model.id).where(
            due_condition(model, now),
            model.webhook_attempts < max_attempts,
            or_(
                model.webhook_state != WebhookState.PENDING,
                model.webhook_next_attempt_at < late,
            ),
            or_(model.webhook_state != WebhookState.WAITING, model.finished_at < late),
        )
    ).all()
    sent = 0
    for job_id in overdue:
        try:
            rt.send(WEBHOOK_TASK, f"{kind}:{job_id}")
            sent += 1
        except Exception:
            log.warning("reaper could not enqueue the webhook of %s %s", kind, job_id)
    return sent

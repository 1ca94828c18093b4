"""The reaper: what makes a crash safe on every broker.

- running jobs whose lease expired (their worker died): sent again, so a live worker claims and resumes
  them; after MAX_ATTEMPTS claims they are marked failed;
- queued jobs never sent (broker down at creation) or sent long ago without a claim: sent again;
- finished jobs whose webhook was not delivered: the delivery is sent again.

Every action is idempotent (claims are guarded updates), so several reapers may run at once.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from shared.db import Generation, Training, utcnow
from shared.queue import GENERATE_TASK, TRAIN_TASK, WEBHOOK_TASK

from .lease import MAX_ATTEMPTS
from .runtime import Runtime

log = logging.getLogger("krona.worker.reaper")

__all__ = ["reap_once"]


def reap_once(rt: Runtime) -> dict[str, int]:
    now = utcnow()
    grace = timedelta(seconds=rt.settings.enqueue_grace_seconds)
    counts = {"requeued": 0, "failed": 0, "webhooks": 0}
    for model, task, kind in ((Training, TRAIN_TASK, "training"), (Generation, GENERATE_TASK, "generation")):
        with rt.sessions() as session:
            expired = session.scalars(
                select(model).where(model.status == "running", model.lease_expires_at < now)
            ).all()
            for row in expired:
                if row.attempts >= MAX_ATTEMPTS:
                    result = session.execute(
                        update(model)
                        .where(model.id == row.id, model.status == "running", model.lease_expires_at < now)
                        .values(
                            status="failed",
                            finished_at=now,
                            updated_at=now,
                            error_code="worker_lost",
                            error_message=f"the worker running this job stopped {row.attempts} times",
                            lease_owner=None,
                        )
                    )
                    session.commit()
                    counts["failed"] += result.rowcount
                    continue
                _send(rt, session, model, task, row.id)
                counts["requeued"] += 1
            stale = session.scalars(
                select(model.id).where(
                    model.status == "queued", or_(model.enqueued_at.is_(None), model.enqueued_at < now - grace)
                )
            ).all()
            for job_id in stale:
                _send(rt, session, model, task, job_id)
                counts["requeued"] += 1
            undelivered = session.scalars(
                select(model.id).where(
                    model.webhook_url.is_not(None),
                    model.webhook_delivered_at.is_(None),
                    model.finished_at.is_not(None),
                    and_(model.finished_at < now - timedelta(seconds=30), model.finished_at > now - timedelta(days=1)),
                )
            ).all()
            for job_id in undelivered:
                try:
                    rt.send(WEBHOOK_TASK, f"{kind}:{job_id}")
                    counts["webhooks"] += 1
                except Exception:
                    log.warning("reaper could not enqueue webhook %s:%s", kind, job_id)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts


def _send(rt: Runtime, session, model, task: str, job_id: str) -> None:
    try:
        rt.send(task, job_id)
    except Exception:
        log.warning("reaper could not enqueue %s %s", task, job_id)
        return
    session.execute(update(model).where(model.id == job_id).values(enqueued_at=utcnow()))
    session.commit()

"""Webhook delivery on terminal states: one signed POST per attempt, its state kept on the job's row.

The row is the truth, as for jobs. A delivery is claimed with a guarded update (``waiting`` or a due
``pending`` -> ``sending``, attempts + 1, a lease longer than the request's deadline), so it is never in
flight twice however many messages or reapers ask for it, and it stops at ``webhook_max_attempts``.
After the attempt: ``delivered`` (2xx), ``rejected`` (another 4xx: retrying would not help),
``pending`` with the next attempt's time (network error, deadline, a host that does not resolve within
RESOLVE_TIMEOUT_SECONDS, 5xx, 429), or ``given_up``. The task is sent again with a countdown for the next
attempt; the reaper sends overdue ones (a lost message or a crashed worker) and gives up leases that
expired on the last attempt.

Why the schedule is not Celery's ``autoretry_for`` / ``retry_backoff`` / ``retry_backoff_max``: Celery
keeps a retry's count and time in the message, and those three guarantees need them on the row.

- Exact attempt count: Celery counts ``request.retries`` per message. A message the reaper sends again
  (after broker loss or a crashed worker) starts at 0, and a duplicate message counts on its own, so
  ``max_retries`` bounds the retries of one message, not the POSTs a receiver gets (when the retries were
  Celery's, a receiver got 16 POSTs with a limit of 5). ``webhook_attempts``, counted by the claim, is exact.
- Never in flight twice: only the guarded claim on the row gives that; Celery's retry would still have
  to go through it.
- Survives broker loss: a retry that exists only as a message is gone with the broker (or with the
  worker holding it as an ETA task). ``webhook_next_attempt_at`` outlives both, and the reaper acts on it.

Keeping both would mean two schedules that must agree: ``retry_backoff`` adds random jitter, so Celery's
retry would often arrive before the row's next attempt is due, find nothing to claim, and leave the
delivery to the reaper, late. So the task makes one attempt, and the message that wakes the next one is
only a wake-up call, as for jobs; the backoff is ``retry_delay``.

Deliveries run on their own queue (``webhooks``) and worker pool, so a slow receiver never holds a
GPU worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update

from shared.db import Generation, Tenant, Training, WebhookState, utcnow
from shared.queue import WEBHOOK_TASK
from shared.schemas import generation_public, training_public
from shared.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    USER_AGENT,
    DeliveryError,
    ResolutionTimeout,
    post,
    resolve_webhook_target,
    sign,
)

from .runtime import Runtime

log = logging.getLogger("krona.worker.webhooks")

__all__ = ["JOB_KINDS", "deliver_webhook", "notify", "retry_delay"]

JOB_KINDS = {"training": Training, "generation": Generation}
# A claim outlives the request's deadline by this much before another worker may take it over.
LEASE_MARGIN_SECONDS = 30
MAX_RETRY_DELAY_SECONDS = 300.0


def retry_delay(attempt: int, base_seconds: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), at most 300."""
    return min(MAX_RETRY_DELAY_SECONDS, base_seconds * 2 ** (attempt - 1))


def due_condition(model, now):
    """SQL condition: the delivery may be claimed now."""
    return and_(
        model.finished_at.is_not(None),
        model.webhook_url.is_not(None),
        or_(
            model.webhook_state == WebhookState.WAITING,
            and_(model.webhook_state == WebhookState.PENDING, model.webhook_next_attempt_at <= now),
            and_(model.webhook_state == WebhookState.SENDING, model.webhook_lease_expires_at < now),
        ),
    )


def _claim(rt: Runtime, model, job_id: str) -> int | None:
    """Take the delivery for one attempt; its attempt number, or None if it is not due or not ours to take."""
    now = utcnow()
    lease = timedelta(seconds=rt.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS)
    with rt.sessions() as session:
        result = session.execute(
            update(model)
            .where(
                model.id == job_id,
                due_condition(model, now),
                model.webhook_attempts < rt.settings.webhook_max_attempts,
            )
            .values(
                webhook_state=WebhookState.SENDING,
                webhook_attempts=model.webhook_attempts + 1,
                webhook_lease_expires_at=now + lease,
            )
            .returning(model.webhook_attempts)
        )
        attempt = result.scalar()
        session.commit()
    return attempt


def _finish(rt: Runtime, model, job_id: str, attempt: int, **values) -> bool:
    """Record an attempt's outcome, only if the claim is still ours (guarded by state and attempt number)."""
    with rt.sessions() as session:
        result = session.execute(
            update(model)
            .where(model.id == job_id, model.webhook_state == WebhookState.SENDING, model.webhook_attempts == attempt)
            .values(webhook_lease_expires_at=None, **values)
        )
        session.commit()
    return result.rowcount == 1


def webhook_event(kind: str, job_id: str, body: dict) -> dict:
    """The delivered JSON: ``id`` (the same on every retry of this event: receivers dedupe on it), ``type``
    (``training.succeeded``, ``generation.failed``, …), ``created`` (Unix seconds: when the job ended) and
    ``data`` (the job as GET returns it), like Stripe's and Replicate's events."""
    event_type = f"{kind}.{body['status']}"
    digest = hashlib.sha256(f"{kind}:{job_id}:{body['status']}".encode()).hexdigest()[:24]
    ended = body.get("finished_at") or body.get("updated_at")
    created = int(datetime.fromisoformat(ended).timestamp()) if ended else int(time.time())
    return {"id": f"evt_{digest}", "type": event_type, "created": created, "data": body}


def deliver_webhook(rt: Runtime, ref: str) -> str:
    """One attempt for ``ref`` ("training:<id>" or "generation:<id>").

    Returns delivered, rejected, refused, retrying, given_up, filtered (the job's ``webhook_events`` do not name
    this event) or skipped (not due: delivered already,
    in flight elsewhere, or its next attempt is not yet due).
    """
    kind, _, job_id = ref.partition(":")
    model = JOB_KINDS.get(kind)
    attempt = None if model is None else _claim(rt, model, job_id)
    if attempt is None:
        return "skipped"
    settings = rt.settings
    with rt.sessions() as session:
        row = session.get(model, job_id)
        if row is None:  # the job was deleted (DELETE /v1/…, or its tenant) after the claim
            return "skipped"
        secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == row.tenant_id))
        if kind == "training":
            body = training_public(row, None, settings.public_url)
        else:
            body = generation_public(row, settings.public_url)
        url, wanted = row.webhook_url, row.webhook_events
    event = webhook_event(kind, job_id, body)
    if wanted and event["type"] not in wanted:  # the client asked for other events only
        _finish(rt, model, job_id, attempt, webhook_state=WebhookState.FILTERED)
        return "filtered"
    payload = json.dumps(event, separators=(",", ":")).encode()

    status, error = None, None
    try:
        target = resolve_webhook_target(url, allow_private=settings.allow_private_webhooks)
    except ResolutionTimeout as exc:  # the resolver hangs: a failed attempt like a network error, retried
        target, error = None, str(exc)
    except ValueError as exc:  # refused now (DNS changed, or the setting did): never retried
        log.warning("webhook of %s refused: %s", ref, exc)
        _finish(rt, model, job_id, attempt, webhook_state=WebhookState.REFUSED, webhook_last_error=str(exc)[:1000])
        return "refused"
    if target is not None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: event["id"],
            SIGNATURE_HEADER: sign(payload, secret),
        }
        try:
            status = post(
                target,
                payload,
                headers,
                deadline_seconds=settings.webhook_timeout_seconds,
                max_response_bytes=settings.webhook_max_response_bytes,
            )
            error = None if status < 500 and status != 429 else f"HTTP {status}"
        except DeliveryError as exc:
            error = str(exc)
    now = utcnow()

    if error is None:  # the receiver answered: 2xx delivered, another 4xx rejected (retrying would not help)
        state = "delivered" if 200 <= status < 300 else "rejected"
        last_error = None if state == "delivered" else f"HTTP {status}"
        _finish(
            rt, model, job_id, attempt, webhook_state=state, webhook_delivered_at=now, webhook_last_error=last_error
        )
        return state
    if attempt >= settings.webhook_max_attempts:
        _finish(rt, model, job_id, attempt, webhook_state=WebhookState.GIVEN_UP, webhook_last_error=error[:1000])
        log.warning("webhook of %s given up after %d attempts: %s", ref, attempt, error)
        return "given_up"
    # Worth another attempt (network error, deadline, a hung resolver, 5xx, 429): the row says when; the message
    # only wakes it.
    delay = retry_delay(attempt, settings.webhook_retry_base_seconds)
    next_attempt_at = now + timedelta(seconds=delay)
    _finish(
        rt, model, job_id, attempt, webhook_state=WebhookState.PENDING, webhook_next_attempt_at=next_attempt_at,
        webhook_last_error=error[:1000],
    )  # fmt: skip
    log.info("webhook of %s failed (attempt %d): %s; next in %.1f s", ref, attempt, error, delay)
    try:
        rt.send(WEBHOOK_TASK, ref, countdown=delay)
    except Exception:
        log.warning("could not schedule the next webhook attempt of %s; the reaper will", ref)
    return "retrying"


def notify(rt: Runtime, model, kind: str, job_id: str) -> None:
    """After a terminal state: send the webhook task if the job has a webhook (the reaper retries a failed send)."""
    try:
        with rt.sessions() as session:
            url = session.scalar(select(model.webhook_url).where(model.id == job_id))
        if url:
            rt.send(WEBHOOK_TASK, f"{kind}:{job_id}")
    except Exception:  # the database or the broker is down: the reaper sends deliveries that are due
        log.warning("could not enqueue the webhook of %s; the reaper will", job_id)

"""Webhook delivery on terminal states: HMAC-signed POST, retried with backoff, marked delivered on a 2xx."""

from __future__ import annotations

import json
import logging

from shared.db import Generation, Training, utcnow
from shared.schemas import generation_public, training_public
from shared.webhooks import SIGNATURE_HEADER, check_webhook_url, sign

from .runtime import Runtime

log = logging.getLogger("krona.worker.webhooks")

__all__ = ["WebhookFailed", "deliver_webhook", "notify"]


class WebhookFailed(Exception):
    """A delivery that may succeed later (network error, 5xx, 429); the task retries it."""


def deliver_webhook(rt: Runtime, ref: str) -> str:
    """``ref`` is "training:<id>" or "generation:<id>". Returns delivered/skipped/refused; raises WebhookFailed."""
    import httpx

    kind, _, job_id = ref.partition(":")
    model = {"training": Training, "generation": Generation}.get(kind)
    if model is None:
        return "skipped"
    with rt.sessions() as session:
        row = session.get(model, job_id)
        if row is None or not row.webhook_url or row.webhook_delivered_at is not None or row.finished_at is None:
            return "skipped"
        if kind == "training":
            body = training_public(row)
        else:
            body = generation_public(row, rt.settings.public_url)
        url = row.webhook_url
    event = {"type": f"{kind}.{body['status']}", "data": body}
    payload = json.dumps(event, separators=(",", ":")).encode()
    try:
        check_webhook_url(url, allow_private=rt.settings.allow_private_webhooks)  # again: DNS may have changed
    except ValueError as exc:
        log.warning("webhook of %s refused: %s", ref, exc)
        _mark_delivered(rt, model, job_id)  # never retried
        return "refused"
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(payload, rt.settings.webhook_secret)}
    try:
        response = httpx.post(url, content=payload, headers=headers, timeout=10.0, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise WebhookFailed(f"{ref}: {exc}") from exc
    if response.status_code >= 500 or response.status_code == 429:
        raise WebhookFailed(f"{ref}: HTTP {response.status_code}")
    _mark_delivered(rt, model, job_id)
    return "delivered" if response.is_success else f"rejected ({response.status_code})"


def _mark_delivered(rt: Runtime, model, job_id: str) -> None:
    from sqlalchemy import update

    with rt.sessions() as session:
        session.execute(update(model).where(model.id == job_id).values(webhook_delivered_at=utcnow()))
        session.commit()


def notify(rt: Runtime, model, kind: str, job_id: str) -> None:
    """After a terminal state: send the webhook task if the job has a webhook (the reaper retries a failed send)."""
    from sqlalchemy import select

    from shared.queue import WEBHOOK_TASK

    with rt.sessions() as session:
        url = session.scalar(select(model.webhook_url).where(model.id == job_id))
    if url:
        try:
            rt.send(WEBHOOK_TASK, f"{kind}:{job_id}")
        except Exception:
            log.warning("could not enqueue the webhook of %s; the reaper will", job_id)

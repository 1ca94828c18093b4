"""Creating generations and batches: references checked in bulk, rows built, committed once, messages sent.

The routes are plain `def` (FastAPI runs them in the threadpool) and call these with keyword arguments.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import ACTIVE_STATUSES, Adapter, Batch, Generation, JobStatus, Tenant, WebhookState, new_id, utcnow
from shared.errors import Invalid, NotFound, TooLarge
from shared.limits import tenant_limits
from shared.queue import GENERATE_TASK
from shared.scheduler import generation_cost
from shared.schemas import BatchCreate, BatchPublic, GenerationCreate, generation_public, job_urls
from shared.webhooks import check_webhook_url

from ..context import AppContext
from ..jobs import admission, cancel_jobs, commit_created, enqueue, enqueue_many, replay, request_hash

__all__ = ["BATCH_STATUSES", "batch_publics", "cancel_batch", "create_batch", "create_generation", "send_batch"]


def _check_requests(
    context: AppContext, session: Session, tenant: Tenant, specs: list[GenerationCreate], label
) -> None:
    """404 for an adapter that is not this tenant's; 422 for a request over the compute cap or a refused webhook
    URL: one query, one lookup per URL."""
    wanted = {spec.adapter_id for spec in specs if spec.adapter_id is not None}
    owned = set()
    if wanted:
        owned = set(session.scalars(select(Adapter.id).where(Adapter.id.in_(wanted), Adapter.tenant_id == tenant.id)))
    checked: dict[str, str | None] = {}
    size = context.native_size()
    cap = tenant_limits(context.settings, tenant.limits).max_generation_compute
    for i, spec in enumerate(specs):
        compute = (spec.width or size) * (spec.height or size) * spec.steps * spec.num_images
        if compute > cap:
            raise Invalid(
                "compute_limit",
                f"{label(i)}width x height x steps x num_images = {compute:,} is over this server's limit of "
                f"{cap:,}; ask for fewer steps, images or pixels",
                {"compute": compute, "limit": cap},
            )
        if spec.adapter_id is not None and spec.adapter_id not in owned:
            raise NotFound("adapter_not_found", f"{label(i)}no adapter {spec.adapter_id!r}")
        if spec.webhook_url:
            if spec.webhook_url not in checked:
                try:
                    check_webhook_url(spec.webhook_url, allow_private=context.settings.allow_private_webhooks)
                    checked[spec.webhook_url] = None
                except ValueError as exc:
                    checked[spec.webhook_url] = str(exc)
            if checked[spec.webhook_url] is not None:
                raise Invalid("invalid_webhook_url", f"{label(i)}{checked[spec.webhook_url]}")


def _new_generation(context: AppContext, tenant: Tenant, spec: GenerationCreate, batch_id: str | None) -> Generation:
    """The row of one request whose references were checked (not yet added)."""
    size = context.native_size()
    width, height = spec.width or size, spec.height or size
    return Generation(
        id=new_id("gen"),
        tenant_id=tenant.id,
        batch_id=batch_id,
        adapter_id=spec.adapter_id,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        adapter_scale=spec.adapter_scale,
        num_images=spec.num_images,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        width=width,
        height=height,
        cost=generation_cost(width, height, spec.steps, spec.num_images),
        seed=spec.seed if spec.seed is not None else secrets.randbelow(2**31),
        webhook_url=spec.webhook_url,
        webhook_events=sorted(set(spec.webhook_events)) if spec.webhook_events else None,
        webhook_state=WebhookState.WAITING if spec.webhook_url else None,
        enqueued_at=utcnow(),  # cleared again if the message cannot be sent (jobs.enqueue_many)
    )


def create_generation(
    *, context: AppContext, session: Session, tenant: Tenant, spec: GenerationCreate, idempotency_key: str | None
) -> tuple[int, dict[str, Any]]:
    """(status, body): 202 and the new Generation (its message sent), or the first answer to a repeated key."""
    fingerprint = request_hash(json.dumps(spec.model_dump(mode="json"), sort_keys=True))
    stored = replay(session, tenant, idempotency_key, "generations", fingerprint)
    if stored is not None:
        return stored
    _check_requests(context, session, tenant, [spec], lambda _: "")
    row = _new_generation(context, tenant, spec, None)
    with admission(context, session, tenant, Generation, 1):
        session.add(row)
        session.flush()
        public = generation_public(row, context.settings.public_url)
        status_code, public = commit_created(session, tenant, idempotency_key, "generations", fingerprint, 202, public)
    if public.get("id") == row.id:
        enqueue(context, session, Generation, row.id, GENERATE_TASK)
    return status_code, public


def create_batch(
    *, context: AppContext, session: Session, tenant: Tenant, spec: BatchCreate, idempotency_key: str | None
) -> tuple[int, dict[str, Any], list[str]]:
    """(status, body, ids whose messages are still to send): the rows are committed in one transaction with
    enqueued_at set; the caller sends the messages after answering (send_batch)."""
    if len(spec.generations) > context.settings.max_batch_generations:
        raise TooLarge("batch_too_large", f"at most {context.settings.max_batch_generations} generations")
    fingerprint = request_hash(json.dumps(spec.model_dump(mode="json"), sort_keys=True))
    stored = replay(session, tenant, idempotency_key, "batches", fingerprint)
    if stored is not None:
        return *stored, []
    batch = Batch(id=new_id("bat"), tenant_id=tenant.id, total=len(spec.generations))
    _check_requests(context, session, tenant, spec.generations, lambda i: f"generations[{i}]: ")
    rows = [_new_generation(context, tenant, item, batch.id) for item in spec.generations]
    with admission(context, session, tenant, Generation, len(rows)):
        session.add(batch)
        session.flush()
        session.add_all(rows)
        session.flush()
        ids = sorted(row.id for row in rows)
        counts = {JobStatus.QUEUED: len(ids)} | dict.fromkeys(
            (JobStatus.RUNNING, "canceling", JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED), 0
        )
        public = BatchPublic(
            id=batch.id,
            total=batch.total,
            counts=counts,
            generation_ids=ids,
            urls=job_urls(context.settings.public_url, "batches", batch.id),
            created_at=batch.created_at,
        ).model_dump(mode="json")
        status_code, public = commit_created(session, tenant, idempotency_key, "batches", fingerprint, 202, public)
    if public.get("id") != batch.id:  # a concurrent twin with the same Idempotency-Key won
        return status_code, public, []
    return status_code, public, ids


def send_batch(context: AppContext, ids: list[str]) -> None:
    """Send the batch's messages; a send that fails clears enqueued_at so that the reaper sends those rows."""
    with context.sessions() as session:
        enqueue_many(context, session, Generation, ids, GENERATE_TASK)


# Every status a batch's counts name (zero included), `canceling` too.
BATCH_STATUSES = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    "canceling",
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELED,
)


def batch_publics(session: Session, batches: list[Batch], public_url: str) -> list[dict]:
    """The public bodies of a page of batches: counts per status and generation ids in two grouped queries."""
    ids = [batch.id for batch in batches]
    counts = {batch_id: dict.fromkeys(BATCH_STATUSES, 0) for batch_id in ids}
    members: dict[str, list[str]] = {batch_id: [] for batch_id in ids}
    if ids:
        rows = session.execute(
            select(Generation.batch_id, Generation.status, Generation.cancel_requested, func.count())
            .where(Generation.batch_id.in_(ids))
            .group_by(Generation.batch_id, Generation.status, Generation.cancel_requested)
        )
        for batch_id, status, cancel_requested, count in rows:
            shown = "canceling" if status == JobStatus.RUNNING and cancel_requested else status
            counts[batch_id][shown] = counts[batch_id].get(shown, 0) + count
        for batch_id, generation_id in session.execute(
            select(Generation.batch_id, Generation.id).where(Generation.batch_id.in_(ids)).order_by(Generation.id)
        ):
            members[batch_id].append(generation_id)
    return [
        BatchPublic(
            id=batch.id,
            total=batch.total,
            counts=counts[batch.id],
            generation_ids=members[batch.id],
            urls=job_urls(public_url, "batches", batch.id),
            created_at=batch.created_at,
        ).model_dump(mode="json")
        for batch in batches
    ]


def cancel_batch(*, context: AppContext, session: Session, batch: Batch) -> None:
    """Cancel every generation of the batch that has not ended (jobs.cancel_jobs)."""
    active = list(
        session.scalars(
            select(Generation.id).where(Generation.batch_id == batch.id, Generation.status.in_(ACTIVE_STATUSES))
        )
    )
    if active:
        cancel_jobs(context, session, Generation, active, "generation")

"""/v1/generations and /v1/batches: image requests, with or without an adapter."""

from __future__ import annotations

import json
import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from shared.db import Adapter, Batch, Generation, Tenant, new_id, utcnow
from shared.queue import GENERATE_TASK
from shared.schemas import BatchCreate, BatchPublic, GenerationCreate, GenerationPublic, as_utc, generation_public
from shared.storage import BlobNotFound
from shared.webhooks import check_webhook_url

from ..context import AppContext
from ..deps import ContextDep, CurrentTenant, SessionDep
from ..errors import ApiError
from ..jobs import commit_created, created, enqueue, enqueue_many, get_owned, replay, request_hash
from ..openapi import errors

router = APIRouter(tags=["generations"], responses=errors(401, 422, 503))


def _check_references(
    context: AppContext, session: Session, tenant: Tenant, specs: list[GenerationCreate], label
) -> None:
    """404 for an adapter that is not this tenant's, 422 for a refused webhook URL: one query, one lookup per URL."""
    wanted = {spec.adapter_id for spec in specs if spec.adapter_id is not None}
    owned = set()
    if wanted:
        owned = set(session.scalars(select(Adapter.id).where(Adapter.id.in_(wanted), Adapter.tenant_id == tenant.id)))
    checked: dict[str, str | None] = {}
    for i, spec in enumerate(specs):
        if spec.adapter_id is not None and spec.adapter_id not in owned:
            raise ApiError(404, "adapter_not_found", f"{label(i)}no adapter {spec.adapter_id!r}")
        if spec.webhook_url:
            if spec.webhook_url not in checked:
                try:
                    check_webhook_url(spec.webhook_url, allow_private=context.settings.allow_private_webhooks)
                    checked[spec.webhook_url] = None
                except ValueError as exc:
                    checked[spec.webhook_url] = str(exc)
            if checked[spec.webhook_url] is not None:
                raise ApiError(422, "invalid_webhook_url", f"{label(i)}{checked[spec.webhook_url]}")


def _new_generation(context: AppContext, tenant: Tenant, spec: GenerationCreate, batch_id: str | None) -> Generation:
    """The row of one request whose references were checked (not yet added)."""
    size = context.native_size()
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
        width=spec.width or size,
        height=spec.height or size,
        seed=spec.seed if spec.seed is not None else secrets.randbelow(2**31),
        webhook_url=spec.webhook_url,
        webhook_state="waiting" if spec.webhook_url else None,
        enqueued_at=utcnow(),  # cleared again if the message cannot be sent (jobs.enqueue_many)
    )


@router.post(
    "/v1/generations",
    status_code=202,
    response_model=GenerationPublic,
    summary="Ask for images",
    responses=errors(400, 404, 409),
)
def create_generation(
    body: GenerationCreate,
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    fingerprint = request_hash(json.dumps(body.model_dump(mode="json"), sort_keys=True))
    stored = replay(session, tenant, idempotency_key, "generations", fingerprint)
    if stored is not None:
        return created(stored[1], stored[0], "generations")
    _check_references(context, session, tenant, [body], lambda _: "")
    row = _new_generation(context, tenant, body, None)
    session.add(row)
    session.flush()
    public = generation_public(row, context.settings.public_url)
    status_code, public = commit_created(session, tenant, idempotency_key, "generations", fingerprint, 202, public)
    if public.get("id") == row.id:
        enqueue(context, session, Generation, row.id, GENERATE_TASK)
    return created(public, status_code, "generations")


@router.get(
    "/v1/generations/{generation_id}", response_model=GenerationPublic, summary="One generation", responses=errors(404)
)
def get_generation(generation_id: str, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    row = get_owned(session, Generation, generation_id, tenant, "generation")
    return generation_public(row, context.settings.public_url)


@router.get(
    "/v1/generations/{generation_id}/images/{index}",
    summary="One generated image",
    responses={200: {"content": {"image/png": {}}}, **errors(404)},
    response_class=Response,
)
def get_generation_image(
    generation_id: str, index: int, context: ContextDep, session: SessionDep, tenant: CurrentTenant
):
    row = get_owned(session, Generation, generation_id, tenant, "generation")
    image = next((i for i in row.images if i["index"] == index), None)
    if image is None:
        raise ApiError(404, "image_not_found", f"generation {generation_id} has no image {index} (status {row.status})")
    try:
        data = context.storage.get_bytes(image["key"])
    except BlobNotFound:
        raise ApiError(404, "image_not_found", f"image {index} of {generation_id} is missing from storage") from None
    return Response(data, media_type="image/png")


def _batch_public(session: Session, batch: Batch) -> dict:
    counts = {s: 0 for s in ("queued", "running", "succeeded", "failed", "canceled")}
    for status, count in session.execute(
        select(Generation.status, func.count()).where(Generation.batch_id == batch.id).group_by(Generation.status)
    ):
        counts[status] = count
    ids = list(session.scalars(select(Generation.id).where(Generation.batch_id == batch.id).order_by(Generation.id)))
    return BatchPublic(
        id=batch.id, total=batch.total, counts=counts, generation_ids=ids, created_at=as_utc(batch.created_at)
    ).model_dump(mode="json")


@router.post(
    "/v1/batches",
    status_code=202,
    response_model=BatchPublic,
    summary="Up to 1000 generations at once",
    responses=errors(400, 404, 409, 413),
)
def create_batch(
    body: BatchCreate,
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    idempotency_key: Annotated[str | None, Header()] = None,
):
    if len(body.generations) > context.settings.max_batch_generations:
        raise ApiError(413, "batch_too_large", f"at most {context.settings.max_batch_generations} generations")
    fingerprint = request_hash(json.dumps(body.model_dump(mode="json"), sort_keys=True))
    stored = replay(session, tenant, idempotency_key, "batches", fingerprint)
    if stored is not None:
        return created(stored[1], stored[0], "batches")
    batch = Batch(id=new_id("bat"), tenant_id=tenant.id, total=len(body.generations))
    _check_references(context, session, tenant, body.generations, lambda i: f"generations[{i}]: ")
    rows = [_new_generation(context, tenant, spec, batch.id) for spec in body.generations]
    session.add(batch)
    session.flush()
    session.add_all(rows)
    session.flush()
    ids = sorted(row.id for row in rows)
    counts = {status: 0 for status in ("queued", "running", "succeeded", "failed", "canceled")} | {"queued": len(ids)}
    public = BatchPublic(
        id=batch.id, total=batch.total, counts=counts, generation_ids=ids, created_at=batch.created_at
    ).model_dump(mode="json")
    status_code, public = commit_created(session, tenant, idempotency_key, "batches", fingerprint, 202, public)
    if public.get("id") != batch.id:  # a concurrent twin with the same Idempotency-Key won
        return created(public, status_code, "batches")
    # The rows are committed (with enqueued_at set): the messages go out after the answer, and a send that
    # fails clears enqueued_at so that the reaper sends those rows instead (jobs.enqueue_many).
    return created(public, status_code, "batches", background=BackgroundTask(_send_batch, context, ids))


def _send_batch(context: AppContext, ids: list[str]) -> None:
    with context.sessions() as session:
        enqueue_many(context, session, Generation, ids, GENERATE_TASK)


@router.get(
    "/v1/batches/{batch_id}",
    response_model=BatchPublic,
    summary="A batch with counts per status",
    responses=errors(404),
)
def get_batch(batch_id: str, session: SessionDep, tenant: CurrentTenant):
    return _batch_public(session, get_owned(session, Batch, batch_id, tenant, "batch"))

"""/v1/generations and /v1/batches: image requests, with or without an adapter."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from starlette.background import BackgroundTask

from shared.db import Batch, Generation
from shared.schemas import (
    BatchCreate,
    BatchPublic,
    GenerationCreate,
    GenerationPublic,
    Page,
    generation_public,
    queue_positions,
)
from shared.storage import BlobNotFound

from ..deps import AuthenticatedRoute, BatchId, ContextDep, CurrentTenant, GenerationId, IdempotencyKey, SessionDep
from ..errors import ApiError
from ..jobs import Paging, StatusParam, cancel_owned, created, get_owned, page, status_filters
from ..openapi import ErrorResponse, errors
from ..services import generations, retention

router = APIRouter(route_class=AuthenticatedRoute, tags=["generations"], responses=errors(401, 422, 503))


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
    idempotency_key: IdempotencyKey = None,
):
    """Queue a generation: `num_images` images of `prompt`, with the tenant's adapter at `adapter_scale`
    (or the base model). Poll the Generation or give a `webhook_url`."""
    status_code, public = generations.create_generation(
        context=context, session=session, tenant=tenant, spec=body, idempotency_key=idempotency_key
    )
    return created(public, status_code, "generations")


@router.get(
    "/v1/generations",
    response_model=Page[GenerationPublic],
    summary="List generations, newest first",
    responses=errors(400),
)
def list_generations(
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    paging: Paging,
    status: StatusParam = None,
    adapter_id: Annotated[
        str | None, Query(pattern="^adp_[0-9a-f]{24}$", examples=["adp_3f2a9c0d1e2b4a5f6c7d8e9f"])
    ] = None,
    batch_id: Annotated[
        str | None, Query(pattern="^bat_[0-9a-f]{24}$", examples=["bat_3f2a9c0d1e2b4a5f6c7d8e9f"])
    ] = None,
):
    """The tenant's generations, newest first, optionally of one status, adapter or batch; pass `next_cursor`
    as `cursor` for the next page."""
    filters = status_filters(Generation, status) + tuple(
        column == value
        for column, value in ((Generation.adapter_id, adapter_id), (Generation.batch_id, batch_id))
        if value is not None
    )
    rows, next_cursor = page(session, Generation, tenant, paging, filters)
    positions = queue_positions(session, Generation, tenant.id, rows)
    data = [generation_public(r, context.settings.public_url, positions.get(r.id)) for r in rows]
    return {"data": data, "next_cursor": next_cursor}


@router.get(
    "/v1/generations/{generation_id}", response_model=GenerationPublic, summary="One generation", responses=errors(404)
)
def get_generation(generation_id: GenerationId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """One generation: its status and, once it succeeded, the URLs of its images."""
    row = get_owned(session, Generation, generation_id, tenant, "generation")
    position = queue_positions(session, Generation, tenant.id, [row]).get(row.id)
    return generation_public(row, context.settings.public_url, position)


@router.post(
    "/v1/generations/{generation_id}/cancel",
    status_code=202,
    response_model=GenerationPublic,
    summary="Stop a generation",
    responses=errors(404, 409),
)
def cancel_generation(generation_id: GenerationId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """Cancel a generation: a queued one at once (`canceled`), a running one at its worker's next denoising step
    (`canceling` until then; no images are kept); 409 once it has ended."""
    row = cancel_owned(context, session, Generation, generation_id, tenant, "generation")
    return generation_public(row, context.settings.public_url)


@router.delete(
    "/v1/generations/{generation_id}",
    status_code=204,
    summary="Delete an ended generation with its images",
    responses=errors(404, 409),
    response_class=Response,
)
def delete_generation(generation_id: GenerationId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """Delete a generation that has ended (succeeded, failed or canceled) and its images; 409
    `generation_active` while it is queued or running. A batch it was part of keeps its `total`; its `counts`
    and `generation_ids` no longer include it."""
    retention.delete_generation(context=context, session=session, tenant=tenant, generation_id=generation_id)
    return Response(status_code=204)


IMAGE_EXPIRED = {
    "model": ErrorResponse,
    "description": "the images were deleted after the server's retention time (KRONA_GENERATION_TTL_HOURS)",
}


@router.get(
    "/v1/generations/{generation_id}/images/{index}",
    summary="One generated image",
    responses={
        200: {"content": {"image/png": {}, "application/octet-stream": {}}},
        **errors(404),
        410: IMAGE_EXPIRED,
    },
    response_class=Response,
)
def get_generation_image(
    generation_id: GenerationId,
    index: int,
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
):
    """One generated image (PNG); 410 `image_expired` once the images were deleted after the server's retention
    time (`images_expired_at` of the Generation). Sent as `image/png`, or as `application/octet-stream` to a client
    that asks for that and not for images (generated clients that only know bytes)."""
    row = get_owned(session, Generation, generation_id, tenant, "generation")
    image = next((i for i in row.images if i["index"] == index), None)
    if image is None:
        raise ApiError(404, "image_not_found", f"generation {generation_id} has no image {index} (status {row.status})")
    if row.images_expired_at is not None:
        expired = row.images_expired_at.isoformat()
        raise ApiError(410, "image_expired", f"the images of {generation_id} were deleted at {expired} (retention)")
    try:
        data = context.storage.get_bytes(image["key"])
    except BlobNotFound:
        raise ApiError(404, "image_not_found", f"image {index} of {generation_id} is missing from storage") from None
    wants_bytes = accept is not None and "application/octet-stream" in accept and "image/" not in accept
    return Response(data, media_type="application/octet-stream" if wants_bytes else "image/png")


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
    idempotency_key: IdempotencyKey = None,
):
    """Queue up to 1000 generations in one request (one transaction; the messages go out after the answer)."""
    status_code, public, to_send = generations.create_batch(
        context=context, session=session, tenant=tenant, spec=body, idempotency_key=idempotency_key
    )
    # The rows are committed: the messages go out after the answer (one producer for all of them).
    background = BackgroundTask(generations.send_batch, context, to_send) if to_send else None
    return created(public, status_code, "batches", background=background)


@router.get(
    "/v1/batches", response_model=Page[BatchPublic], summary="List batches, newest first", responses=errors(400)
)
def list_batches(
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    paging: Paging,
):
    """The tenant's batches, newest first, with counts per status; pass `next_cursor` as `cursor`."""
    rows, next_cursor = page(session, Batch, tenant, paging)
    return {"data": generations.batch_publics(session, rows, context.settings.public_url), "next_cursor": next_cursor}


@router.post(
    "/v1/batches/{batch_id}/cancel",
    status_code=202,
    response_model=BatchPublic,
    summary="Stop a batch's generations",
    responses=errors(404),
)
def cancel_batch(batch_id: BatchId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """Cancel every generation of the batch that has not ended: queued ones at once, running ones at their next
    step. Ended ones keep their images. Canceling a batch twice is not an error."""
    batch = get_owned(session, Batch, batch_id, tenant, "batch")
    generations.cancel_batch(context=context, session=session, batch=batch)
    return generations.batch_publics(session, [batch], context.settings.public_url)[0]


@router.get(
    "/v1/batches/{batch_id}",
    response_model=BatchPublic,
    summary="A batch with counts per status",
    responses=errors(404),
)
def get_batch(batch_id: BatchId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """A batch: how many of its generations are in each status, and their ids."""
    batch = get_owned(session, Batch, batch_id, tenant, "batch")
    return generations.batch_publics(session, [batch], context.settings.public_url)[0]

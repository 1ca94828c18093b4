"""/v1/trainings: upload subject photos, follow the fine-tune, cancel it, delete it."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from shared.db import TERMINAL_STATUSES, Training
from shared.schemas import Page, TrainingPublic, queue_positions, training_public

from ..deps import (
    AuthenticatedRoute,
    ContextDep,
    CurrentPrincipal,
    CurrentTenant,
    IdempotencyKey,
    SessionDep,
    TrainingId,
)
from ..errors import ApiError, error_body
from ..events import FollowerRefused, TooManyStreams, TrainingGone
from ..jobs import Paging, StatusParam, cancel_owned, created, get_owned, page, status_filters
from ..openapi import errors
from ..services import retention
from ..services.trainings import (
    CLIENT_PARAMS,
    MAX_NAME_CHARS,
    MAX_PARAMS_BYTES,
    MAX_WEBHOOK_URL_CHARS,
    read_training_form,
)
from ..services.trainings import create_training as create_training_service

router = APIRouter(
    route_class=AuthenticatedRoute, prefix="/v1/trainings", tags=["trainings"], responses=errors(401, 422, 503)
)

# The form's fields, declared for FastAPI (which parses the multipart body) and so for the OpenAPI document.
Images = Annotated[
    list[UploadFile],
    File(
        description="2-20 photos of the subject: PNG, JPEG or WebP, at least 64 px on the short side, at most "
        "40 MP and 20 MiB each (KRONA_MIN_IMAGES, KRONA_MAX_IMAGES, KRONA_MAX_IMAGE_* on this server)",
        # Stated for clients; the service checks the server's own settings (422 too few, 413 too many).
        json_schema_extra={"minItems": 2, "maxItems": 20},
    ),
]
InstancePrompt = Annotated[str, Form(min_length=1, max_length=1000, examples=["a photo of sks dog"])]
Params = Annotated[
    str | None,
    Form(
        max_length=MAX_PARAMS_BYTES,
        description="JSON object of training parameters: " + ", ".join(sorted(CLIENT_PARAMS)),
        examples=['{"steps": 500, "learning_rate": 0.001, "a1": 64, "a2": 8}'],
    ),
]
Name = Annotated[str | None, Form(max_length=MAX_NAME_CHARS)]
WebhookEvents = Annotated[
    str | None,
    Form(
        max_length=200,
        description="the events the webhook is sent for, comma-separated (default: every one): "
        "training.succeeded, training.failed, training.canceled",
        examples=["training.succeeded,training.failed"],
    ),
]
WebhookUrl = Annotated[
    str | None,
    Form(
        max_length=MAX_WEBHOOK_URL_CHARS,
        pattern=r"^https?://[^/?#@\s]+",
        description="http(s) URL whose host resolves to global addresses only",
    ),
]
# Text fields up to 1 MiB (params is capped lower, by its own check); files are counted by the service.
FORM_LIMITS = {"max_fields": 20, "max_part_size": 1024 * 1024}


@router.post(
    "",
    status_code=202,
    response_model=TrainingPublic,
    summary="Start a fine-tune on 2-20 photos of a subject",
    responses=errors(400, 409, 413, 415),
    form_limits=FORM_LIMITS,
)
async def create_training(
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    images: Images,
    instance_prompt: InstancePrompt,
    params: Params = None,
    name: Name = None,
    webhook_url: WebhookUrl = None,
    webhook_events: WebhookEvents = None,
    idempotency_key: IdempotencyKey = None,
):
    """Start a DreamBooth-KronA fine-tune on 2-20 photos of one subject. Everything is checked before anything
    is stored; the answer is the queued Training. Follow it by polling, by its event stream, or a webhook."""
    fields = {"instance_prompt": instance_prompt, "raw_params": params, "name": name, "webhook_url": webhook_url,
              "webhook_events": webhook_events}  # fmt: skip
    submitted = await read_training_form(context.settings, images=images, **fields)
    # Decoding, checks, storage and the database are blocking work: the threadpool, not the event loop.
    service = partial(create_training_service, context=context, session=session, tenant=tenant)
    status_code, body = await run_in_threadpool(service, idempotency_key=idempotency_key, submitted=submitted)
    return created(body, status_code, "trainings")


@router.get("", response_model=Page[TrainingPublic], summary="List trainings, newest first", responses=errors(400))
def list_trainings(
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    paging: Paging,
    status: StatusParam = None,
):
    """The tenant's trainings, newest first, optionally of one status; pass `next_cursor` as `cursor`."""
    filters = status_filters(Training, status)
    rows, next_cursor = page(session, Training, tenant, paging, filters)
    positions = queue_positions(session, Training, tenant.id, rows)
    url = context.settings.public_url
    return {"data": [training_public(r, positions.get(r.id), url) for r in rows], "next_cursor": next_cursor}


@router.get(
    "/{training_id}", response_model=TrainingPublic, summary="One training with its progress", responses=errors(404)
)
def get_training(training_id: TrainingId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """One training with its progress (step, total steps, loss, ETA) and, once it succeeded, its adapter."""
    row = get_owned(session, Training, training_id, tenant, "training")
    position = queue_positions(session, Training, tenant.id, [row]).get(row.id)
    return training_public(row, position, context.settings.public_url)


@router.post(
    "/{training_id}/cancel",
    status_code=202,
    response_model=TrainingPublic,
    summary="Stop a training",
    responses=errors(404, 409),
)
def cancel_training(training_id: TrainingId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """Cancel a training: a queued one at once (`canceled`), a running one at its next step (`canceling` until
    its worker stops it, then `canceled`); 409 once it has ended."""
    row = cancel_owned(context, session, Training, training_id, tenant, "training")
    return training_public(row, None, context.settings.public_url)


@router.delete(
    "/{training_id}",
    status_code=204,
    summary="Delete an ended training with its photos",
    responses=errors(404, 409),
    response_class=Response,
)
def delete_training(training_id: TrainingId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """Delete a training that has ended (succeeded, failed or canceled), with its subject photos and checkpoint;
    409 `training_active` while it is queued or running (cancel it first). The adapter it produced is a resource
    of its own and stays: delete it with `DELETE /v1/adapters/{adapter_id}`."""
    retention.delete_training(context=context, session=session, tenant=tenant, training_id=training_id)
    return Response(status_code=204)


def _owned_training(training_id: TrainingId, context: ContextDep, tenant: CurrentTenant) -> str:
    """The id of a training of this tenant (404 otherwise), checked in a short session of its own."""
    with context.sessions() as session:
        get_owned(session, Training, training_id, tenant, "training")
    return training_id


async def _stream_slot(context: ContextDep, tenant: CurrentTenant) -> AsyncIterator[None]:
    """One of the tenant's event-stream slots, held until the stream ends (429 when none is free)."""
    try:
        async with context.progress.slot(tenant.id):
            yield
    except TooManyStreams:
        raise ApiError(
            429,
            "too_many_streams",
            f"at most {context.progress.max_streams_per_tenant} event streams per tenant at once; close one",
        ) from None


@router.get(
    "/{training_id}/events",
    summary="Server-sent events of progress until a terminal state",
    response_class=EventSourceResponse,
    responses=errors(404, 429),
)
async def follow_training_events(
    context: ContextDep,
    principal: CurrentPrincipal,
    training_id: Annotated[str, Depends(_owned_training)],
    _slot: Annotated[None, Depends(_stream_slot)],
) -> AsyncIterable[ServerSentEvent]:
    """`event: progress` with the Training on each change of status, step or loss, then one `event: done`.

    Followers share one poller per training and process (services/gateway/events.py); a comment line is
    sent every 15 s while nothing changes, so proxies keep the connection open. The stream ends with one
    `event: error` (the error envelope) when the training is deleted (`training_not_found`) or the key that
    opened it is revoked or its tenant deleted (`unauthorized`, checked every few seconds).
    """

    async def still_allowed() -> bool:
        return await run_in_threadpool(context.key_is_active, principal.key_id)

    try:
        async for body in context.progress.follow(
            training_id, still_allowed=still_allowed, check_every=STREAM_KEY_CHECK_SECONDS
        ):
            yield ServerSentEvent(event="done" if body["status"] in TERMINAL_STATUSES else "progress", data=body)
    except TrainingGone:
        yield ServerSentEvent(event="error", data=error_body("training_not_found", f"training {training_id} is gone"))
    except FollowerRefused:
        message = "the API key that opened this stream was revoked, or its tenant deleted"
        yield ServerSentEvent(event="error", data=error_body("unauthorized", message))


# How often an open stream checks that its key is still valid (while nothing else happens on it).
STREAM_KEY_CHECK_SECONDS = 5.0

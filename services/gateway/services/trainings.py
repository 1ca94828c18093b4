"""Creating a training: reading the multipart form, checking everything, storing images, the row, the message.

The route awaits ``read_training_form`` (the body arrives on the event loop) and runs ``create_training``
(decoding, storage, the database: blocking work) in the threadpool.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fastapi import UploadFile
from sqlalchemy.orm import Session

from shared.db import Tenant, Training, WebhookState, new_id, utcnow
from shared.errors import Invalid, TooLarge
from shared.krona.config import check_factors_fit_shapes
from shared.limits import TenantLimits, tenant_limits
from shared.models.shapes import select_targets
from shared.queue import TRAIN_TASK
from shared.scheduler import training_cost
from shared.schemas import training_public
from shared.settings import Settings
from shared.storage import keys as blob_keys
from shared.training_spec import CLIENT_PARAMS, TrainingSpec
from shared.webhooks import WEBHOOK_EVENTS, check_webhook_url

from ..context import AppContext
from ..jobs import admission, commit_created, enqueue, replay, request_hash
from .adapters import check_adapter_room
from .uploads import decode_uploaded_images, read_uploads, store_photos

__all__ = [
    "CLIENT_PARAMS",
    "TrainingRequest",
    "create_training",
    "decode_uploaded_images",
    "parse_params",
    "read_training_form",
    "read_uploads",
]

# Caps on the free-text form fields (name is a String(200) column).
MAX_NAME_CHARS = 200
MAX_WEBHOOK_URL_CHARS = 2000
MAX_PARAMS_BYTES = 64 * 1024


@dataclass(frozen=True)
class TrainingRequest:
    """A training request read from its form: fields checked, images still undecoded."""

    instance_prompt: str
    name: str | None
    webhook_url: str | None
    raw_params: str | None
    spec: TrainingSpec
    webhook_events: list[str] | None
    files: list[tuple[str, bytes]]


def parse_webhook_events(raw: str | None, kind: str) -> list[str] | None:
    """A form's comma-separated (or JSON list of) event types, each one of ``kind``'s; 422 otherwise."""
    if raw is None or not raw.strip():
        return None
    try:
        names = json.loads(raw) if raw.lstrip().startswith("[") else [n.strip() for n in raw.split(",")]
    except json.JSONDecodeError:
        names = None
    allowed = [event for event in WEBHOOK_EVENTS if event.startswith(kind + ".")]
    if not isinstance(names, list) or not names or any(n not in allowed for n in names):
        raise Invalid(
            "invalid_request",
            f"webhook_events: a comma-separated list of {', '.join(allowed)}",
            {"allowed": allowed},
        )
    return sorted(set(names))


def parse_params(raw: str | None, instance_prompt: str, max_steps: int) -> TrainingSpec:
    params: dict[str, Any] = {}
    if raw:
        try:
            params = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise Invalid("invalid_params", f"params is not valid JSON: {exc.msg}") from None
        if not isinstance(params, dict):
            raise Invalid("invalid_params", "params must be a JSON object")
    unknown = sorted(set(params) - CLIENT_PARAMS)
    if unknown:
        raise Invalid("invalid_params", f"unknown params: {', '.join(unknown)}", {"allowed": sorted(CLIENT_PARAMS)})
    try:
        spec = TrainingSpec(instance_prompt=instance_prompt, **params)
    except ValueError as exc:  # InvalidSpec: every bad field on one line
        raise Invalid("invalid_params", str(exc)) from None
    if spec.steps is not None and spec.steps > max_steps:
        raise Invalid("invalid_params", f"steps must be at most {max_steps} on this server")
    return spec


async def read_training_form(
    settings: Settings,
    *,
    images: list[UploadFile],
    instance_prompt: str,
    raw_params: str | None,
    name: str | None,
    webhook_url: str | None,
    webhook_events: str | None = None,
) -> TrainingRequest:
    """The form's fields (parsed by FastAPI) checked, and the images' bytes read, with every limit that needs no
    decoding checked (4xx otherwise)."""
    uploads = [item for item in images if hasattr(item, "read")]
    if not instance_prompt.strip():
        raise Invalid("invalid_request", "instance_prompt is required, e.g. 'a photo of sks dog'")
    if len(instance_prompt) > 1000:
        raise Invalid("invalid_request", "instance_prompt is limited to 1000 characters")
    if len(uploads) < settings.min_images:
        raise Invalid("too_few_images", f"send at least {settings.min_images} images (got {len(uploads)})")
    if len(uploads) > settings.max_images:
        raise TooLarge("too_many_images", f"at most {settings.max_images} images are accepted")
    for field, value, limit in (("name", name, MAX_NAME_CHARS), ("webhook_url", webhook_url, MAX_WEBHOOK_URL_CHARS)):
        if value is not None and len(value) > limit:
            raise Invalid("invalid_request", f"{field} is limited to {limit} characters (got {len(value):,})")
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise Invalid("invalid_request", f"{field} must not contain NUL characters")
    if raw_params is not None and len(raw_params.encode()) > MAX_PARAMS_BYTES:
        raise Invalid("invalid_params", f"params is limited to {MAX_PARAMS_BYTES:,} bytes of JSON")
    spec = parse_params(raw_params, instance_prompt, settings.max_train_steps)
    events = parse_webhook_events(webhook_events, "training")

    files = await read_uploads(settings, uploads)
    return TrainingRequest(
        instance_prompt=instance_prompt,
        name=name,
        webhook_url=webhook_url,
        raw_params=raw_params,
        spec=spec,
        webhook_events=events,
        files=files,
    )


def check_training_limits(spec: TrainingSpec, *, steps: int, resolution: int, limits: TenantLimits) -> float:
    """The training's cost (shared/scheduler.py: training_cost), after checking it and the parameters that make it
    against the tenant's limits: 422 ``invalid_params`` naming the limit, or ``compute_limit`` over the cost cap."""
    bounds = (
        ("resolution", resolution, limits.max_train_resolution, "max_train_resolution"),
        ("gradient_accumulation", spec.gradient_accumulation, limits.max_gradient_accumulation,
         "max_gradient_accumulation"),
    )  # fmt: skip
    if spec.prior_preservation:
        bounds += (("num_class_images", spec.num_class_images, limits.max_class_images, "max_class_images"),)
    for name, value, limit, setting in bounds:
        if value > limit:
            raise Invalid(
                "invalid_params",
                f"{name} = {value} is over this tenant's limit of {limit} ({setting})",
                {"param": name, "value": value, "limit": limit},
            )
    cost = training_cost(spec, steps=steps, resolution=resolution)
    if cost > limits.max_training_compute:
        raise Invalid(
            "compute_limit",
            f"this training costs {cost:,.0f} units (64x64 denoising steps: steps x batch_size x "
            f"gradient_accumulation x 1.5, plus class, validation and evaluation images, scaled by the "
            f"resolution's area), over this tenant's limit of {limits.max_training_compute:,}; ask for fewer "
            "steps, a smaller gradient_accumulation or resolution, or fewer class images",
            {"cost": round(cost), "limit": limits.max_training_compute},
        )
    return cost


def _checked_request(
    context: AppContext, session: Session, tenant: Tenant, submitted: TrainingRequest
) -> tuple[int, float, list[tuple[bytes, str]]]:
    """Everything a training request is checked for, the cheap checks first (nothing is written until all of it
    passed): its steps, cost, decoded images."""
    settings, spec = context.settings, submitted.spec
    total_steps = spec.steps or settings.default_train_steps or spec.resolved_steps(False)
    cost = check_training_limits(
        spec,
        steps=total_steps,
        resolution=spec.resolution or context.native_size(),
        limits=tenant_limits(settings, tenant.limits),
    )
    try:
        layers = select_targets(context.base_model_shapes(), spec.target_modules)
        check_factors_fit_shapes(layers, spec.krona_config())
    except ValueError as exc:
        raise Invalid("invalid_factors", str(exc)) from None
    context.check_servable((spec.a1, spec.a2), layers)
    check_adapter_room(session, settings, tenant)
    images = decode_uploaded_images(settings, submitted.files)
    if submitted.webhook_url:
        try:
            check_webhook_url(submitted.webhook_url, allow_private=settings.allow_private_webhooks)
        except ValueError as exc:
            raise Invalid("invalid_webhook_url", str(exc)) from None
    return total_steps, cost, images


def _fingerprint(submitted: TrainingRequest, images: list[tuple[bytes, str]]) -> str:
    """What an Idempotency-Key's repeat must match: the request's fields and its photos' digests."""
    return request_hash(
        submitted.instance_prompt,
        submitted.raw_params or "",
        submitted.name or "",
        submitted.webhook_url or "",
        ",".join(submitted.webhook_events or []),
        *[hashlib.sha256(d).digest() for d, _ in images],
    )


def create_training(
    *,
    context: AppContext,
    session: Session,
    tenant: Tenant,
    idempotency_key: str | None,
    submitted: TrainingRequest,
) -> tuple[int, dict[str, Any]]:
    """Check the images and the factors, store the images, insert the row and enqueue it (idempotently).

    Returns (status, body): 202 and the new Training, or the first answer to a repeated Idempotency-Key.
    """
    settings = context.settings
    spec, webhook_url = submitted.spec, submitted.webhook_url
    total_steps, cost, images = _checked_request(context, session, tenant, submitted)

    fingerprint = _fingerprint(submitted, images)
    stored = replay(session, tenant, idempotency_key, "trainings", fingerprint)
    if stored is not None:
        return stored

    training_id = new_id("trn")
    keys = [blob_keys.training_photo(tenant.id, training_id, i, ext) for i, (_, ext) in enumerate(images)]
    store_photos(context.storage, blob_keys.training_folder(tenant.id, training_id), keys, images)
    row = Training(
        id=training_id,
        tenant_id=tenant.id,
        name=submitted.name,
        base_model=settings.base_model,
        instance_prompt=submitted.instance_prompt,
        params={k: v for k, v in spec.to_dict().items() if k in CLIENT_PARAMS or k == "steps"} | {"steps": total_steps},
        image_keys=keys,
        total_steps=total_steps,
        cost=cost,
        webhook_url=webhook_url,
        webhook_events=submitted.webhook_events,
        webhook_state=WebhookState.WAITING if webhook_url else None,
        enqueued_at=utcnow(),  # cleared again if the message cannot be sent (jobs.enqueue_many)
    )

    def remove_images() -> None:
        with contextlib.suppress(Exception):  # best effort: storage may be the part that is down
            context.storage.delete_prefix(blob_keys.training_folder(tenant.id, training_id))

    try:
        with admission(context, session, tenant, Training, 1):
            session.add(row)
            session.flush()
            body = training_public(row, 1 + tenant.queued_trainings, settings.public_url)
            status_code, body = commit_created(
                session, tenant, idempotency_key, "trainings", fingerprint, 202, body, on_conflict=remove_images
            )
    except Exception:
        remove_images()
        raise
    if body.get("id") == training_id:
        enqueue(context, session, Training, training_id, TRAIN_TASK)
    return status_code, body

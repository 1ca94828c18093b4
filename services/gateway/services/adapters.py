"""Uploading an adapter: the file checked and converted (off the event loop), stored, and its row committed."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import UploadFile
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import ACTIVE_STATUSES, Adapter, Evaluation, JobStatus, Tenant, Training, new_id, utcnow
from shared.errors import Conflict, Invalid, TooLarge, Unavailable
from shared.krona.convert import adapter_bytes, max_tensors_for, native_arrays_from_upload, read_safetensors_bytes
from shared.limits import tenant_limits
from shared.queue import EVALUATE_TASK
from shared.scheduler import evaluation_cost
from shared.schemas import adapter_public, latest_evaluations
from shared.settings import Settings
from shared.storage import keys as blob_keys
from shared.training_spec import EvaluationRequest

from ..context import AppContext
from ..jobs import admission, enqueue, get_owned
from .uploads import decode_uploaded_images, read_uploads, store_photos

__all__ = [
    "AdapterUpload",
    "EvaluationUpload",
    "delete_adapter_and_files",
    "read_evaluation_form",
    "read_upload_form",
    "request_evaluation",
    "store_upload",
]

MAX_ADAPTER_BYTES = 256 * 1024 * 1024
MAX_NAME_CHARS = 200
MAX_BASE_MODEL_CHARS = 300


def _convert_upload(context: AppContext, data: bytes, label: str):
    """(stored native file, its arrays, config) for an uploaded file; ValueError if it is not a valid adapter.

    The safetensors header is checked first, with a tensor cap from the base model's layer count (a crafted header
    is refused in milliseconds, holding the GIL no longer); then names, shapes and low-rank sizes against the base
    model before any arithmetic (see plan_lokr_module), so a refused file is never widened or multiplied.
    """
    shapes = context.base_model_shapes()
    arrays, metadata = read_safetensors_bytes(data, label, max_tensors=max_tensors_for(len(shapes)))
    native, config, source = native_arrays_from_upload(arrays, metadata, shapes)
    context.check_servable((config.a1, config.a2), {key.rsplit(".", 1)[0] for key in native})
    stored = adapter_bytes(
        native, config, {"base_model": context.settings.base_model, "created_by": f"upload ({source})"}
    )
    return stored, native, config


def check_adapter_room(session: Session, settings: Settings, tenant: Tenant) -> None:
    """409 ``adapter_limit`` when the tenant's adapters, with its trainings that will make one (queued or running),
    reach its ``max_adapters``. Counted without a lock: racing creates can pass it by the few in flight."""
    cap = tenant_limits(settings, tenant.limits).max_adapters
    adapters = session.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant.id))
    coming = session.scalar(
        select(func.count())
        .select_from(Training)
        .where(Training.tenant_id == tenant.id, Training.status.in_(ACTIVE_STATUSES))
    )
    session.rollback()  # no connection held across what follows (decoding, storage)
    if adapters + coming >= cap:
        raise Conflict(
            "adapter_limit",
            f"this tenant has {adapters} adapters and {coming} trainings under way, the most it may have is {cap}; "
            "delete adapters it no longer needs (DELETE /v1/adapters/{id})",
            {"adapters": adapters, "trainings_active": coming, "limit": cap},
        )


def store_upload(
    *,
    context: AppContext,
    session: Session,
    tenant: Tenant,
    data: bytes,
    label: str | None,
    labels: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Convert, store and record an uploaded adapter; the new Adapter's public body (409 adapter_limit, 422, 503
    otherwise)."""
    check_adapter_room(session, context.settings, tenant)
    try:
        stored, native, config = _convert_upload(context, data, label or "file")
    except ValueError as exc:
        raise Invalid("invalid_adapter", str(exc)) from None
    adapter_id = new_id("adp")
    key = blob_keys.adapter_file(tenant.id, adapter_id)
    try:
        context.storage.put_bytes(key, stored)
    except Exception:
        raise Unavailable("storage_unavailable", "could not store the adapter; try again") from None
    row = Adapter(
        id=adapter_id,
        tenant_id=tenant.id,
        **(labels or {}),
        base_model=context.settings.base_model,
        config=config.to_metadata(),
        num_parameters=int(sum(a.size for a in native.values())),
        size_bytes=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        storage_key=key,
    )
    session.add(row)
    try:
        session.commit()
    except Exception:
        session.rollback()
        with contextlib.suppress(Exception):  # best effort: storage may be down too
            context.storage.delete(key)
        raise
    return adapter_public(row)


def delete_adapter_and_files(*, context: AppContext, session: Session, tenant: Tenant, adapter_id: str) -> None:
    """Delete the adapter's row (its evaluations go with it: foreign key cascade), then its blobs: the file and
    everything under ``tenants/<tenant>/adapters/<id>/``, where its evaluations' reference photos (personal data)
    live. Every blob is tried; a storage fault is raised after the others were tried (503; the retention sweep
    removes what is left, as its rows are gone). A worker running one of its evaluations finds the row gone and
    stops (workers/evaluation.py)."""
    row = get_owned(session, Adapter, adapter_id, tenant, "adapter")
    key = row.storage_key
    session.delete(row)
    session.commit()
    removals = [
        partial(context.storage.delete, key),
        partial(context.storage.delete_prefix, blob_keys.adapter_folder(tenant.id, adapter_id)),
    ]
    failure: Exception | None = None
    for remove in removals:
        try:
            remove()
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


@dataclass(frozen=True)
class AdapterUpload:
    data: bytes
    label: str
    labels: dict[str, str | None]  # name, instance_prompt, identifier


async def read_upload_form(
    settings: Settings,
    *,
    file: UploadFile,
    name: str | None,
    base_model: str | None,
    instance_prompt: str | None = None,
    identifier: str | None = None,
) -> AdapterUpload:
    """The uploaded file's bytes and the form's fields (parsed by FastAPI), with every limit that needs no
    parsing of the file checked."""
    for field, value in (("name", name), ("base_model", base_model), ("instance_prompt", instance_prompt)):
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise Invalid("invalid_request", f"{field} must not contain NUL characters")
    if identifier is not None and (not identifier.strip() or not identifier.isprintable()):
        raise Invalid("invalid_request", "identifier must be printable text, e.g. 'sks'")
    if identifier is None and instance_prompt:
        identifier = EvaluationRequest().subject_words(instance_prompt)[0][:100] or None
    data = await file.read(MAX_ADAPTER_BYTES + 1)
    if len(data) > MAX_ADAPTER_BYTES:
        raise TooLarge("adapter_too_large", f"adapter files are limited to {MAX_ADAPTER_BYTES:,} bytes")
    if base_model and base_model != settings.base_model:
        raise Invalid("base_model_mismatch", f"this server serves {settings.base_model!r}, not {base_model!r}")
    labels = {"name": name, "instance_prompt": instance_prompt, "identifier": identifier}
    return AdapterUpload(data=data, label=file.filename or "file", labels=labels)


# Evaluations (POST /v1/adapters/{id}/evaluations; run by workers/evaluation.py) ------------------------------

MAX_EVALUATION_PARAMS_BYTES = 4096


@dataclass(frozen=True)
class EvaluationUpload:
    request: EvaluationRequest
    files: list[tuple[str, bytes]]


async def read_evaluation_form(
    settings: Settings, *, images: list[UploadFile], raw_params: str | None
) -> EvaluationUpload:
    """The reference images' bytes and the parsed params (4xx for what needs no decoding)."""
    uploads = [item for item in images if hasattr(item, "read")]
    if not uploads:
        raise Invalid("too_few_images", "send at least 1 reference image of the subject")
    if len(uploads) > settings.max_images:
        raise TooLarge("too_many_images", f"at most {settings.max_images} images are accepted")
    if raw_params is not None and len(raw_params.encode()) > MAX_EVALUATION_PARAMS_BYTES:
        raise Invalid("invalid_params", f"params is limited to {MAX_EVALUATION_PARAMS_BYTES:,} bytes of JSON")
    try:
        params = json.loads(raw_params) if raw_params else None
        params = {} if params is None else params  # JSON null: the defaults
        if not isinstance(params, dict):
            raise ValueError('params must be a JSON object, e.g. {"prompts": 4, "class_noun": "dog"}')
        request = EvaluationRequest.parse(params)
    except json.JSONDecodeError:
        raise Invalid("invalid_params", "params is not valid JSON") from None
    except ValueError as exc:  # InvalidSpec: every bad field on one line
        raise Invalid("invalid_params", str(exc)) from None
    files = await read_uploads(settings, uploads)
    return EvaluationUpload(request=request or EvaluationRequest(), files=files)


def request_evaluation(
    *,
    context: AppContext,
    session: Session,
    tenant: Tenant,
    adapter_id: str,
    submitted: EvaluationUpload,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Store the reference photos, insert a queued evaluation (a job of the train queue: counted in the tenant's
    queued jobs, charged its cost, taken in fair order with the trainings) and send its message; the Adapter's
    body with it as ``evaluation``.

    409 ``evaluation_running`` while one of the adapter's evaluations is running; a queued one is replaced
    (canceled, its photos deleted). 429 ``queue_full`` over the tenant's cap on queued jobs.
    """
    settings = context.settings
    adapter = get_owned(session, Adapter, adapter_id, tenant, "adapter")
    request, instance_prompt = _subject_request(session, adapter, submitted.request)
    running = session.scalar(
        select(Evaluation.id)
        .where(Evaluation.adapter_id == adapter_id, Evaluation.status == JobStatus.RUNNING)
        .limit(1)
    )
    if running is not None:
        raise Conflict("evaluation_running", f"adapter {adapter_id} is being evaluated; wait for the result")
    session.rollback()  # no database connection held while the images are decoded
    images = decode_uploaded_images(settings, submitted.files)

    evaluation_id = new_id("evl")
    prefix = blob_keys.evaluation_folder(tenant.id, adapter_id, evaluation_id)
    keys = [
        blob_keys.evaluation_photo(tenant.id, adapter_id, evaluation_id, i, ext) for i, (_, ext) in enumerate(images)
    ]
    store_photos(context.storage, prefix, keys, images)
    state = request.initial_state(
        instance_prompt=instance_prompt,
        clip_model=settings.eval_clip_model,
        dino_model=settings.eval_dino_model,
        reference_images=len(keys),
        requested_at=utcnow().isoformat(),
    )
    params = {k: state[k] for k in ("prompts", "images_per_prompt", "steps", "class_noun", "identifier", "models",
                                    "reference_images")}  # fmt: skip
    row = Evaluation(
        id=evaluation_id,
        tenant_id=tenant.id,
        adapter_id=adapter_id,
        base_model=adapter.base_model,
        params=params,
        reference_keys=keys,
        cost=evaluation_cost(request, context.native_size()),
        enqueued_at=utcnow(),  # cleared again if the message cannot be sent (jobs.enqueue_many)
    )
    _insert_replacing_queued(context, session, tenant, row, prefix)
    enqueue(context, session, Evaluation, evaluation_id, EVALUATE_TASK)
    adapter = session.get(Adapter, adapter_id)
    return adapter_public(adapter, latest_evaluations(session, [adapter_id]).get(adapter_id))


def _subject_request(session: Session, adapter: Adapter, request: EvaluationRequest) -> tuple[EvaluationRequest, str]:
    """The request with the adapter's identifier where it gives none, and the instance prompt the subject's words
    are read from; 422 ``invalid_params`` when a word cannot be had or used."""
    instance_prompt = adapter.instance_prompt or ""
    if not instance_prompt and adapter.training_id:  # an adapter recorded before it kept its prompt
        instance_prompt = (
            session.scalar(select(Training.instance_prompt).where(Training.id == adapter.training_id)) or ""
        )
    if request.identifier is None and adapter.identifier:  # what it was trained or uploaded with
        request = request.model_copy(update={"identifier": adapter.identifier})
    identifier, class_noun = request.subject_words(instance_prompt)
    if not class_noun:
        raise Invalid(
            "invalid_params",
            'this adapter has no instance prompt to take the class from: give params.class_noun ("dog")',
        )
    if not identifier:
        raise Invalid(
            "invalid_params",
            'this adapter has no identifier (its rare token): give params.identifier, e.g. "sks", or upload it '
            "with its instance_prompt or identifier",
        )
    for name, word in (("identifier", identifier), ("class_noun", class_noun)):
        if len(word) > 100 or not word.isprintable():
            raise Invalid(
                "invalid_params", f"the {name} read off the training's prompt is not usable: give params.{name}"
            )
    return request, instance_prompt


def _insert_replacing_queued(
    context: AppContext, session: Session, tenant: Tenant, row: Evaluation, prefix: str
) -> None:
    """Insert the evaluation, under the tenant's admission checks, canceling the adapter's queued one (a newer
    request replaces it) and deleting that one's photos; on failure the new photos (under ``prefix``) go."""
    replaced: list[str] = []
    try:
        with admission(context, session, tenant, Evaluation, 1):
            queued = session.scalars(
                select(Evaluation)
                .where(Evaluation.adapter_id == row.adapter_id, Evaluation.status == JobStatus.QUEUED)
                .with_for_update()
            ).all()
            for old in queued:  # a newer request replaces a queued one
                replaced += list(old.reference_keys or [])
                old.status, old.reference_keys, old.finished_at = JobStatus.CANCELED, [], utcnow()
                old.error_code, old.error_message = "replaced", f"replaced by evaluation {row.id}"
            session.add(row)
            session.commit()
    except Exception:
        with contextlib.suppress(Exception):
            context.storage.delete_prefix(prefix)
        raise
    for key in replaced:
        with contextlib.suppress(Exception):  # the storage sweep takes what is left
            context.storage.delete(key)

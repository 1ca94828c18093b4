"""Request and response bodies of the HTTP API (pydantic), kept apart from the database models.

In `shared` because the workers send the same bodies in webhooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from sqlalchemy import func, select

from shared.db import Evaluation, JobStatus
from shared.limits import LimitOverrides, tenant_limits
from shared.training_spec import CLIENT_PARAMS, EvaluationRequest, TrainingSpec

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.db import Adapter, ApiKey, Evaluation, Generation, Tenant, Training
    from shared.settings import Settings

T = TypeVar("T")

# `canceling`: a running job whose cancel was asked for, until its worker stops it (then `canceled`).
Status = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]


class ErrorInfo(BaseModel):
    code: str
    message: str


class Progress(BaseModel):
    step: int = Field(description="optimizer steps done")
    total_steps: int
    loss: float | None = None
    eta_seconds: float | None = Field(None, description="seconds left in the training phase, from its steps so far")
    phase: str | None = Field(
        None,
        description="what the job is doing: queued, then loading_model, class_images (prior preservation), "
        "training, evaluating (params.evaluate), uploading; null once it ended",
        examples=["training"],
    )


class JobUrls(BaseModel):
    """Absolute URLs of what can be done with the job (from KRONA_PUBLIC_URL), as Replicate's `urls`."""

    get: str = Field(examples=["https://krona.example.com/v1/trainings/trn_3f2a9c0d1e2b4a5f6c7d8e9f"])
    cancel: str
    events: str | None = Field(None, description="the server-sent event stream (trainings)")


def job_urls(public_url: str, collection: str, job_id: str, events: bool = False) -> dict[str, str | None]:
    base = f"{public_url.rstrip('/')}/v1/{collection}/{job_id}"
    return {"get": base, "cancel": f"{base}/cancel", "events": f"{base}/events" if events else None}


# The `params` of POST /v1/adapters/{id}/evaluations and a training's `params.evaluate`: one model, the one the
# workers run (its fields and bounds are in shared/training_spec.py).
EvaluationParams = EvaluationRequest

# The `params` part of POST /v1/trainings: the CLIENT_PARAMS subset of TrainingSpec (its fields, bounds and
# descriptions), so the schema, the gateway's check and the trainer cannot drift apart.
TrainingParams = create_model(
    "TrainingParams",
    __config__=ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"steps": 500, "learning_rate": 0.001, "a1": 64, "a2": 8, "seed": 7}]},
    ),
    __doc__="The `params` part of POST /v1/trainings: a JSON object; every field is optional (the defaults are the "
    "paper's; GET /v1/capabilities has this server's). Sent as a multipart part with `Content-Type: "
    "application/json` (or as plain text holding the same JSON).",
    **{name: (field.annotation, field) for name, field in TrainingSpec.model_fields.items() if name in CLIENT_PARAMS},  # type: ignore[call-overload]
)


class TrainingPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "trn_3f2a9c0d1e2b4a5f6c7d8e9f",
                    "name": "rex",
                    "status": "running",
                    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "instance_prompt": "a photo of sks dog",
                    "progress": {
                        "step": 120,
                        "total_steps": 500,
                        "loss": 0.113,
                        "eta_seconds": 95.0,
                        "phase": "training",
                    },
                    "queue_position": None,
                    "adapter_id": None,
                    "error": None,
                    "params": {"steps": 500, "learning_rate": 0.001, "a1": 64, "a2": 8},
                    "num_images": 5,
                    "created_at": "2026-11-29T10:00:00+00:00",
                    "updated_at": "2026-11-29T10:02:00+00:00",
                    "started_at": "2026-11-29T10:00:03+00:00",
                    "finished_at": None,
                    "images_deleted_at": None,
                }
            ]
        }
    )

    id: str = Field(examples=["trn_3f2a9c0d1e2b4a5f6c7d8e9f"])
    name: str | None = None
    status: Status
    base_model: str
    instance_prompt: str
    progress: Progress
    urls: JobUrls | None = None
    queue_position: int | None = Field(
        None,
        description="while queued: 1 + this tenant's queued trainings created before it (its jobs are served "
        "oldest first; other tenants' share the workers by the fair scheduler)",
    )
    adapter_id: str | None = None
    error: ErrorInfo | None = None
    params: dict[str, Any]
    num_images: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    images_deleted_at: datetime | None = Field(
        None,
        description="when the subject photos and checkpoint were deleted from storage: as the training ended, "
        "unless the server keeps them (KRONA_KEEP_TRAINING_IMAGES)",
    )


class AdapterConfig(BaseModel):
    a1: int
    a2: int
    targets: list[str]


class EvaluationModels(BaseModel):
    clip: str = Field(description="the CLIP model of CLIP-I and CLIP-T (hub id or folder)")
    dino: str = Field(description="the DINO ViT of the DINO score")


class AdapterEvaluation(BaseModel):
    """The adapter's scores (DreamBooth's metrics, shared/eval) and the state of the job that computes them."""

    id: str | None = Field(None, description="the evaluation's id", examples=["evl_3f2a9c0d1e2b4a5f6c7d8e9f"])
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    clip_i: float | None = Field(None, description="CLIP image similarity, generated vs the subject's photos")
    clip_t: float | None = Field(None, description="CLIP similarity of the generated images and their prompts")
    dino: float | None = Field(None, description="DINO ViT-S/16 similarity, generated vs the subject's photos")
    prompts: int = Field(description="evaluation prompts used (the first N of DreamBooth's for the class)")
    images_per_prompt: int
    steps: int = Field(description="denoising steps per image")
    class_noun: str
    identifier: str
    reference_images: int = Field(description="the subject's real images the scores compare against")
    models: EvaluationModels
    error: ErrorInfo | None = None
    requested_at: datetime | None = None
    finished_at: datetime | None = None


class AdapterPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "adp_0a1b2c3d4e5f60718293a4b5",
                    "name": "rex",
                    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "config": {"a1": 64, "a2": 8, "targets": ["to_k", "to_out.0", "to_q", "to_v"]},
                    "num_parameters": 248176,
                    "size_bytes": 1001528,
                    "sha256": "9f2c…",
                    "training_id": "trn_3f2a9c0d1e2b4a5f6c7d8e9f",
                    "created_at": "2026-11-29T10:08:00+00:00",
                }
            ]
        }
    )

    id: str = Field(examples=["adp_0a1b2c3d4e5f60718293a4b5"])
    name: str | None = None
    base_model: str
    config: AdapterConfig
    num_parameters: int
    size_bytes: int
    sha256: str
    training_id: str | None = None
    instance_prompt: str | None = Field(None, description="the prompt it was trained with")
    identifier: str | None = Field(None, description="its rare token, used by its evaluations")
    created_at: datetime
    evaluation: AdapterEvaluation | None = Field(
        None, description="CLIP-I/CLIP-T/DINO scores (params.evaluate or POST .../evaluations); null: not evaluated"
    )


class GenerationCreate(BaseModel):
    """One image request. Width/height default to the base model's native size."""

    # strict: no coercion (false is not a seed, "2" is not a count); what the schema allows is what is accepted.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a photo of sks dog on the moon",
                    "adapter_id": "adp_0a1b2c3d4e5f60718293a4b5",
                    "num_images": 2,
                    "seed": 7,
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=2000)
    adapter_id: str | None = None
    adapter_scale: float = Field(1.0, ge=0.0, le=2.0)
    negative_prompt: str | None = Field(None, max_length=2000)
    num_images: int = Field(1, ge=1, le=8)
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    webhook_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://[^/?#@\s]+",
        description="http(s) URL whose host resolves to global addresses only",
    )
    webhook_events: list[Literal["generation.succeeded", "generation.failed", "generation.canceled"]] | None = Field(
        None, min_length=1, max_length=3, description="the events the webhook is sent for (default: every one)"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("prompt", "negative_prompt", "webhook_url", "adapter_id")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ValueError("must not contain NUL characters")
        return value


class ImagePublic(BaseModel):
    index: int
    url: str
    seed: int


class GenerationPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "gen_5e6f708192a3b4c5d6e7f809",
                    "status": "succeeded",
                    "prompt": "a photo of sks dog on the moon",
                    "adapter_id": "adp_0a1b2c3d4e5f60718293a4b5",
                    "adapter_scale": 1.0,
                    "num_images": 1,
                    "steps": 25,
                    "width": 512,
                    "height": 512,
                    "seed": 7,
                    "batch_id": None,
                    "images": [
                        {"index": 0, "url": "https://krona.example.com/v1/generations/gen_…/images/0", "seed": 7}
                    ],
                    "error": None,
                    "created_at": "2026-11-29T10:10:00+00:00",
                    "updated_at": "2026-11-29T10:10:09+00:00",
                    "started_at": "2026-11-29T10:10:01+00:00",
                    "finished_at": "2026-11-29T10:10:09+00:00",
                    "images_expired_at": None,
                }
            ]
        }
    )

    id: str = Field(examples=["gen_5e6f708192a3b4c5d6e7f809"])
    status: Status
    prompt: str
    adapter_id: str | None = None
    adapter_scale: float
    num_images: int
    steps: int
    width: int
    height: int
    seed: int
    batch_id: str | None = None
    urls: JobUrls | None = None
    phase: str | None = Field(
        None,
        description="queued, then loading_model, generating, uploading; null once it ended",
        examples=["generating"],
    )
    queue_position: int | None = Field(
        None, description="while queued: 1 + this tenant's queued generations created before it"
    )
    images: list[ImagePublic]
    error: ErrorInfo | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    images_expired_at: datetime | None = Field(
        None,
        description="when the images were deleted, KRONA_GENERATION_TTL_HOURS after the generation finished; "
        "their URLs answer 410 image_expired from then on",
    )


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    generations: list[GenerationCreate] = Field(min_length=1, max_length=1000)


class BatchPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "bat_11223344556677889900aabb",
                    "total": 2,
                    "counts": {"queued": 1, "running": 1, "succeeded": 0, "failed": 0, "canceled": 0},
                    "generation_ids": ["gen_5e6f708192a3b4c5d6e7f809", "gen_6f708192a3b4c5d6e7f8091a"],
                    "created_at": "2026-11-29T10:10:00+00:00",
                }
            ]
        }
    )

    id: str = Field(examples=["bat_11223344556677889900aabb"])
    total: int
    counts: dict[str, int]
    generation_ids: list[str]
    urls: JobUrls | None = None
    created_at: datetime


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None


# Presenting rows (the gateway's answers and the workers' webhook bodies) ----------------------------


def _error(row: Training | Generation | Evaluation) -> dict[str, str] | None:
    if row.error_code is None:
        return None
    return {"code": row.error_code, "message": row.error_message or ""}


def queue_positions(
    session: Session,
    model: type[Training] | type[Generation],
    tenant_id: str,
    rows: Iterable[Training | Generation],
) -> dict[str, int]:
    """Each queued row's place among the tenant's queued jobs of ``model`` (1 = next): one query, only when a row
    is queued."""

    wanted = {row.id for row in rows if row.status == JobStatus.QUEUED}
    if not wanted:
        return {}
    ranked = (
        select(model.id, func.row_number().over(order_by=(model.created_at, model.id)).label("position"))
        .where(model.tenant_id == tenant_id, model.status == JobStatus.QUEUED)
        .subquery()
    )
    found = session.execute(select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_(wanted)))
    return {job_id: position for job_id, position in found}


def public_status(row: Training | Generation) -> str:
    """The status a client sees: `canceling` for a running job whose cancel was asked for."""
    if row.status == JobStatus.RUNNING and getattr(row, "cancel_requested", False):
        return "canceling"
    return row.status


def job_phase(row: Training | Generation) -> str | None:
    """The phase a client sees: queued, the worker's phase while running (loading_model until it wrote one), none
    once the job ended."""
    if row.status == JobStatus.QUEUED:
        return "queued"
    if row.status == JobStatus.RUNNING:
        return row.phase or "loading_model"
    return None


def training_public(row: Training, queue_position: int | None = None, public_url: str = "") -> dict[str, Any]:
    progress = {"step": row.step, "total_steps": row.total_steps, "loss": row.loss, "eta_seconds": row.eta_seconds}
    return TrainingPublic(
        id=row.id,
        name=row.name,
        status=public_status(row),
        base_model=row.base_model,
        instance_prompt=row.instance_prompt,
        progress={**progress, "phase": job_phase(row)},
        urls=job_urls(public_url, "trainings", row.id, events=True),
        queue_position=queue_position if row.status == JobStatus.QUEUED else None,
        adapter_id=row.adapter_id,
        error=_error(row),
        params=row.params,
        num_images=len(row.image_keys),
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        images_deleted_at=row.images_deleted_at,
    ).model_dump(mode="json")


def adapter_public(row: Adapter, evaluation: Evaluation | None = None) -> dict[str, Any]:
    """The Adapter, with its latest evaluation (``latest_evaluations``) if it has one."""
    config = row.config
    return AdapterPublic(
        id=row.id,
        name=row.name,
        base_model=row.base_model,
        config={"a1": config["a1"], "a2": config["a2"], "targets": config.get("targets", [])},
        num_parameters=row.num_parameters,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        training_id=row.training_id,
        instance_prompt=row.instance_prompt,
        identifier=row.identifier,
        created_at=row.created_at,
        evaluation=evaluation_public(evaluation) if evaluation is not None else None,
    ).model_dump(mode="json")


def evaluation_public(row: Evaluation) -> AdapterEvaluation:
    """The public part of an evaluation's row (its lease and the reference photos' keys stay inside)."""
    params, scores = row.params or {}, row.scores or {}
    return AdapterEvaluation(
        id=row.id,
        status=row.status,
        clip_i=scores.get("clip_i"),
        clip_t=scores.get("clip_t"),
        dino=scores.get("dino"),
        prompts=params.get("prompts") or 0,
        images_per_prompt=params.get("images_per_prompt") or 0,
        steps=params.get("steps") or 0,
        class_noun=params.get("class_noun") or "",
        identifier=params.get("identifier") or "",
        reference_images=params.get("reference_images") or 0,
        models=params.get("models") or {"clip": "", "dino": ""},
        error=_error(row),
        requested_at=row.created_at,
        finished_at=row.finished_at,
    )


def latest_evaluations(session: Session, adapter_ids: list[str]) -> dict[str, Evaluation]:
    """The newest evaluation of each of these adapters that has one: one query for a page of adapters."""

    if not adapter_ids:
        return {}
    newest = (
        select(
            Evaluation.id,
            func.row_number()
            .over(partition_by=Evaluation.adapter_id, order_by=(Evaluation.created_at.desc(), Evaluation.id.desc()))
            .label("rank"),
        )
        .where(Evaluation.adapter_id.in_(adapter_ids))
        .subquery()
    )
    rows = session.scalars(select(Evaluation).join(newest, newest.c.id == Evaluation.id).where(newest.c.rank == 1))
    return {row.adapter_id: row for row in rows}


def generation_public(row: Generation, public_url: str, queue_position: int | None = None) -> dict[str, Any]:
    base = public_url.rstrip("/")
    images = [
        {
            "index": image["index"],
            "url": f"{base}/v1/generations/{row.id}/images/{image['index']}",
            "seed": image["seed"],
        }
        for image in row.images
    ]
    return GenerationPublic(
        id=row.id,
        status=public_status(row),
        prompt=row.prompt,
        adapter_id=row.adapter_id,
        adapter_scale=row.adapter_scale,
        num_images=row.num_images,
        steps=row.steps,
        width=row.width,
        height=row.height,
        seed=row.seed,
        batch_id=row.batch_id,
        urls=job_urls(public_url, "generations", row.id),
        phase=job_phase(row),
        queue_position=queue_position if row.status == JobStatus.QUEUED else None,
        images=images,
        error=_error(row),
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        images_expired_at=row.images_expired_at,
    ).model_dump(mode="json")


# API keys and tenants -----------------------------------------------------------------------------------

TENANT_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"name": "ci"}]})

    name: str | None = Field(None, min_length=1, max_length=100, description="a label for people; not unique")

    @field_validator("name")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ValueError("must not contain NUL characters")
        return value


class ApiKeyPublic(BaseModel):
    """A tenant's API key as listed: never the key itself (only its first characters) nor its hash."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "key_7c1d2e3f4a5b6c7d8e9f0a1b",
                    "name": "ci",
                    "prefix": "krona_Xy3_9a",
                    "created_at": "2026-11-29T10:00:00+00:00",
                    "last_used_at": "2026-11-29T10:05:00+00:00",
                    "revoked_at": None,
                }
            ]
        }
    )

    id: str = Field(examples=["key_7c1d2e3f4a5b6c7d8e9f0a1b"])
    name: str | None = None
    prefix: str = Field(description="the key's first 12 characters, to tell keys apart")
    created_at: datetime
    last_used_at: datetime | None = Field(None, description="to the minute when no rate limit applies")
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the key itself: shown only in this answer (the server keeps its SHA-256)")


class LimitsBody(LimitOverrides):
    """Per-tenant overrides of the server's limits; absent (or, in a PATCH, null) takes the server's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator(
        "rate_limit_burst",
        "max_queued_jobs",
        "max_running_jobs",
        "max_generation_compute",
        "max_training_compute",
        "max_class_images",
        "max_gradient_accumulation",
        "max_train_resolution",
        "max_api_keys",
        "max_adapters",
        mode="before",
    )
    @classmethod
    def _integral_number(cls, value: Any) -> Any:
        # JSON Schema's integer includes 5.0; strict mode still refuses true and "5".
        return int(value) if isinstance(value, float) and value.is_integer() else value


class TenantCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"name": "acme", "weight": 2, "limits": {"max_queued_jobs": 500}}]},
    )

    name: str = Field(pattern=TENANT_NAME_PATTERN, description="1-100 letters, digits, '-', '_' or '.'; unique")
    weight: float = Field(1.0, gt=0, le=1000, description="share of the workers under contention (default 1)")
    limits: LimitsBody | None = None


class TenantUpdate(BaseModel):
    """Only what is sent changes: `weight` null is back to 1; a limit set to null (or `limits` null: all of them)
    goes back to the server's default."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"weight": 3, "limits": {"rate_limit_per_second": 20, "max_queued_jobs": None}}]
        },
    )

    weight: float | None = Field(None, gt=0, le=1000)
    limits: LimitsBody | None = None


class EffectiveLimits(BaseModel):
    """What applies to the tenant: each override, else the server's setting of the same name."""

    rate_limit_per_second: float = Field(description="requests per second per API key; 0 = no limit")
    rate_limit_burst: int
    max_queued_jobs: int = Field(description="queued trainings + generations; 0 = no cap")
    max_running_jobs: int = Field(description="per queue; 0 = no cap")
    max_generation_compute: int = Field(description="width x height x steps x num_images of one generation")
    max_training_compute: int = Field(description="a training's cost in 64x64 denoising steps (see the README)")
    max_class_images: int = Field(description="num_class_images of one training")
    max_gradient_accumulation: int = Field(description="gradient_accumulation of one training")
    max_train_resolution: int = Field(description="resolution of one training, in pixels")
    max_api_keys: int = Field(description="active API keys")
    max_adapters: int = Field(description="adapters, counting trainings queued or running")


class TenantPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ten_1a2b3c4d5e6f708192a3b4c5",
                    "name": "acme",
                    "weight": 2.0,
                    "limits": {"max_queued_jobs": 500},
                    "effective_limits": {
                        "rate_limit_per_second": 20.0,
                        "rate_limit_burst": 200,
                        "max_queued_jobs": 500,
                        "max_running_jobs": 0,
                        "max_generation_compute": 209715200,
                        "max_training_compute": 20000000,
                        "max_class_images": 200,
                        "max_gradient_accumulation": 16,
                        "max_train_resolution": 1024,
                        "max_api_keys": 20,
                        "max_adapters": 1000,
                    },
                    "created_at": "2026-11-29T10:00:00+00:00",
                }
            ]
        }
    )

    id: str = Field(examples=["ten_1a2b3c4d5e6f708192a3b4c5"])
    name: str
    weight: float
    limits: dict[str, int | float] = Field(description="the overrides set on this tenant; the rest are the defaults")
    effective_limits: EffectiveLimits
    created_at: datetime


class TenantCreated(BaseModel):
    tenant: TenantPublic
    api_key: str = Field(description="the tenant's first API key: shown only in this answer")
    webhook_secret: str = Field(description="signs the tenant's webhook deliveries: shown only in this answer")


def api_key_public(row: ApiKey, key: str | None = None) -> dict[str, Any]:
    """The listed shape; with ``key``, the answer to its creation (the only time the key is shown)."""
    fields = {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    }
    if key is None:
        return ApiKeyPublic(**fields).model_dump(mode="json")
    return ApiKeyCreated(**fields, key=key).model_dump(mode="json")


def tenant_public(row: Tenant, settings: Settings) -> dict[str, Any]:
    overrides = {k: v for k, v in (row.limits or {}).items() if v is not None}
    return TenantPublic(
        id=row.id,
        name=row.name,
        weight=row.weight if row.weight is not None else 1.0,
        limits=overrides,
        effective_limits=asdict(tenant_limits(settings, overrides)),
        created_at=row.created_at,
    ).model_dump(mode="json")

"""The database schema (SQLAlchemy 2). The row is the source of truth for every job; the broker only wakes workers."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Adapter",
    "ApiKey",
    "Base",
    "Batch",
    "Generation",
    "IdempotencyKey",
    "SchemaCompatibility",
    "Tenant",
    "TenantService",
    "Training",
    "UTCDateTime",
    "UsageRecord",
    "new_id",
    "utcnow",
]

# Explicit constraint names, so that migrations are the same on PostgreSQL and SQLite.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    """A job's status in the database (trainings, generations, evaluations). The API also shows ``canceling``, a
    running job whose cancel was asked for (shared/schemas.py: public_status)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


class WebhookState(StrEnum):
    """A job's webhook delivery (workers/webhooks.py)."""

    WAITING = "waiting"  # the job has not ended, or its delivery was not sent yet
    SENDING = "sending"  # claimed by a webhook worker, with a lease
    PENDING = "pending"  # an attempt failed; the next is scheduled
    DELIVERED = "delivered"  # 2xx
    REJECTED = "rejected"  # another 4xx: retrying would not help
    REFUSED = "refused"  # the target is not allowed (any more)
    GIVEN_UP = "given_up"  # every attempt failed
    FILTERED = "filtered"  # the job's webhook_events do not name this event


class KeyRole(StrEnum):
    """What an API key may do: a tenant's own resources, or the /v1/tenants and operator routes."""

    TENANT = "tenant"
    ADMIN = "admin"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """``trn_3f2a…``: a resource-type prefix and 24 random hex digits (96 bits)."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


_ID = re.compile(r"[a-z]{3}_[0-9a-f]{24}")


def is_id(value: str, prefix: str | None = None) -> bool:
    """Whether ``value`` has the shape of an id ``new_id`` makes (of ``prefix`` if given): checked before a client's
    id reaches the database, so that no text (a NUL byte, say) can make a query fail."""
    return (
        isinstance(value, str)
        and _ID.fullmatch(value) is not None
        and (prefix is None or value.startswith(prefix + "_"))
    )


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp with its zone, read back as an aware UTC datetime on every database: PostgreSQL keeps the zone,
    SQLite does not (its values come back naive, and are UTC because every writer writes ``utcnow()``)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}  # noqa: RUF012


class Tenant(Base):
    __tablename__ = "tenants"
    # The tenants with queued jobs of each queue, where the fair scheduler starts (migration 0010).
    __table_args__ = (
        Index(
            "ix_tenants_waiting_infer",
            "id",
            postgresql_where=text("queued_generations > 0"),
            sqlite_where=text("queued_generations > 0"),
        ),
        Index(
            "ix_tenants_waiting_train",
            "id",
            postgresql_where=text("queued_trainings > 0 OR queued_evaluations > 0"),
            sqlite_where=text("queued_trainings > 0 OR queued_evaluations > 0"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Signs this tenant's webhook deliveries (shared.webhooks.sign); shown once, rotatable.
    webhook_secret: Mapped[str] = mapped_column(String(64))
    # The tenant's share of the workers (fair scheduling, shared/scheduler.py): served cost / weight is equalized.
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    # Overrides of the settings' limits (shared/limits.py: TenantLimits); absent keys take the defaults.
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    # Queued trainings, generations and evaluations, kept by triggers (migrations 0007 and 0008), and the cap on
    # their sum that the insert trigger enforces (NULL: none); the gateway stores the tenant's effective cap there
    # (services/gateway/jobs.py: admission). Read-only for the code: only the triggers write the counters.
    queued_trainings: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queued_generations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queued_evaluations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    queued_cap: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def queued_jobs(self) -> int:
        """Queued trainings, generations and evaluations (what ``max_queued_jobs`` caps)."""
        return (self.queued_trainings or 0) + (self.queued_generations or 0) + (self.queued_evaluations or 0)


class ApiKey(Base):
    """An API key, stored as its SHA-256 (keys are 256-bit random, so a plain hash is enough).

    ``role`` is ``tenant`` (the tenant's own resources) or ``admin`` (the /v1/tenants routes; no tenant).
    The key's request-rate token bucket lives on its row (``rate_tokens`` at ``rate_checked``, seconds since
    1970), so that one guarded UPDATE per request enforces the limit across gateway replicas.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16), default="tenant", server_default="tenant")
    name: Mapped[str | None] = mapped_column(String(100), default=None)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    rate_tokens: Mapped[float | None] = mapped_column(Float, default=None)
    rate_checked: Mapped[float | None] = mapped_column(Float, default=None)


class _Job:
    """Columns every leased job shares: status, lease and timestamps."""

    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    # What serving the job costs (shared/scheduler.py: generations width*height*steps*images / 64^2, trainings
    # steps); charged to the tenant's virtual counter when a worker claims the job.
    cost: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    # The event types the webhook is sent for (shared/webhooks.py WEBHOOK_EVENTS); None: every one.
    webhook_events: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    webhook_delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    # Delivery state (workers/webhooks.py): waiting (job not finished or not yet sent), sending (claimed,
    # with a lease), pending (failed, next attempt scheduled), delivered, rejected (4xx), refused, given_up.
    webhook_state: Mapped[str | None] = mapped_column(String(16), default=None, index=True)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


# What a running job is doing, written by its worker (shared/schemas.py: Progress.phase).
TRAINING_PHASES = ("loading_model", "class_images", "training", "evaluating", "uploading")
GENERATION_PHASES = ("loading_model", "generating", "uploading")


class Training(_Job, Base):
    __tablename__ = "trainings"
    __table_args__ = (
        Index("ix_trainings_tenant_created", "tenant_id", "created_at"),
        Index("ix_trainings_status_tenant_created", "status", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("trn"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    base_model: Mapped[str] = mapped_column(String(300))
    instance_prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    image_keys: Mapped[list[Any]] = mapped_column(default=list)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    checkpoint_key: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    adapter_id: Mapped[str | None] = mapped_column(String(32), default=None)
    # Set when the subject's photos were removed from storage (at the end of the training, unless kept).
    images_deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)  # TRAINING_PHASES while running


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("adp"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    base_model: Mapped[str] = mapped_column(String(300))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    num_parameters: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    training_id: Mapped[str | None] = mapped_column(String(32), default=None, unique=True)
    # What it was trained with (its training's, or given with the upload): its evaluation uses them.
    instance_prompt: Mapped[str | None] = mapped_column(Text, default=None)
    identifier: Mapped[str | None] = mapped_column(String(100), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Unused since migration 0008 (evaluations are rows of ``evaluations`` now); kept for code at 0007, to drop.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Evaluation(_Job, Base):
    """An adapter's scoring (CLIP-I, CLIP-T, DINO; workers/evaluation.py). Requested with
    ``POST /v1/adapters/{id}/evaluations`` it is a job of the train queue like a training: leased, taken in fair
    order, counted in the tenant's queued jobs, charged and metered. A training with ``params.evaluate`` scores its
    adapter itself and records the result here, already ended (its work is charged with the training's).

    ``params``: prompts, images_per_prompt, steps, class_noun, identifier, models {clip, dino};
    ``reference_keys``: the uploaded reference photos in storage, deleted when the evaluation ends;
    ``scores``: {clip_i, clip_t, dino} once it succeeded.
    """

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_status_tenant_created", "status", "tenant_id", "created_at"),
        Index("ix_evaluations_adapter_created", "adapter_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("evl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    base_model: Mapped[str] = mapped_column(String(300))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reference_keys: Mapped[list[Any]] = mapped_column(default=list)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("bat"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generation(_Job, Base):
    __tablename__ = "generations"
    __table_args__ = (
        Index("ix_generations_tenant_created", "tenant_id", "created_at"),
        Index("ix_generations_status_tenant_created", "status", "tenant_id", "created_at"),
        # Queued generations by size: the fair scheduler's fallback for the gatherer's filters (migration 0010).
        Index(
            "ix_generations_queued_size",
            "width",
            "height",
            "tenant_id",
            postgresql_where=text("status = 'queued'"),
            sqlite_where=text("status = 'queued'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("gen"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True, default=None)
    adapter_id: Mapped[str | None] = mapped_column(String(32), default=None)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text, default=None)
    adapter_scale: Mapped[float] = mapped_column(Float, default=1.0)
    num_images: Mapped[int] = mapped_column(Integer, default=1)
    steps: Mapped[int] = mapped_column(Integer, default=25)
    guidance_scale: Mapped[float] = mapped_column(Float, default=7.5)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    images: Mapped[list[Any]] = mapped_column(default=list)
    # Set when the images were removed after KRONA_GENERATION_TTL_HOURS.
    images_expired_at: Mapped[datetime | None] = mapped_column(default=None)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)  # GENERATION_PHASES while running
    # POST /v1/generations/{id}/cancel on a running generation: its worker drops it at the next step.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class IdempotencyKey(Base):
    """The first answer to (tenant, Idempotency-Key); replayed for 24 h."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    route: Mapped[str] = mapped_column(String(100))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantService(Base):
    """A tenant's virtual counter per queue: the cost of the work it was served, divided by its weight
    (the Virtual Token Counter of S-LoRA's fair scheduler; shared/scheduler.py)."""

    __tablename__ = "tenant_service"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    queue: Mapped[str] = mapped_column(String(16), primary_key=True)
    counter: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UsageRecord(Base):
    """What one finished job used: written with the job's final status, in the same transaction."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_tenant_day", "tenant_id", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # training | generation | evaluation
    job_id: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    device: Mapped[str] = mapped_column(String(64))
    worker_seconds: Mapped[float] = mapped_column(Float)
    images: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    pixels: Mapped[int] = mapped_column(BigInteger, default=0)
    day: Mapped[str] = mapped_column(String(10))  # UTC date, YYYY-MM-DD
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class SchemaCompatibility(Base):
    """One row: the oldest code revision (migration head) that can run on this schema. Code older than the
    database accepts it when it has this revision (shared/db/session.py ``check_migrated``); an additive
    migration leaves it alone, one that breaks older code sets it to its own revision."""

    __tablename__ = "schema_compatibility"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    compatible_from: Mapped[str] = mapped_column(String(32))

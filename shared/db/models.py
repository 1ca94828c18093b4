"""The database schema (SQLAlchemy 2). The row is the source of truth for every job; the broker only wakes workers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Adapter",
    "ApiKey",
    "Base",
    "Batch",
    "Generation",
    "IdempotencyKey",
    "Tenant",
    "Training",
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

TERMINAL_STATUSES = ("succeeded", "failed", "canceled")
ACTIVE_STATUSES = ("queued", "running")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """``trn_3f2a…``: a resource-type prefix and 24 random hex digits (96 bits)."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}  # noqa: RUF012


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Signs this tenant's webhook deliveries (shared.webhooks.sign); shown once, rotatable.
    webhook_secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key, stored as its SHA-256 (keys are 256-bit random, so a plain hash is enough)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class _Job:
    """Columns every leased job shares: status, lease and timestamps."""

    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
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


class Training(_Job, Base):
    __tablename__ = "trainings"
    __table_args__ = (Index("ix_trainings_tenant_created", "tenant_id", "created_at"),)

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
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("bat"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generation(_Job, Base):
    __tablename__ = "generations"
    __table_args__ = (Index("ix_generations_tenant_created", "tenant_id", "created_at"),)

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

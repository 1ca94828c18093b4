"""Database: SQLAlchemy 2 models and sessions. One schema for PostgreSQL and SQLite, migrated by Alembic."""

from .models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Adapter,
    ApiKey,
    Base,
    Batch,
    Generation,
    IdempotencyKey,
    Tenant,
    TenantService,
    Training,
    UsageRecord,
    is_id,
    new_id,
    utcnow,
)
from .session import DatabaseNotMigrated, check_migrated, make_engine, make_session_factory, upgrade_to_head

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Adapter",
    "ApiKey",
    "Base",
    "Batch",
    "DatabaseNotMigrated",
    "Generation",
    "IdempotencyKey",
    "Tenant",
    "TenantService",
    "Training",
    "UsageRecord",
    "check_migrated",
    "is_id",
    "make_engine",
    "make_session_factory",
    "new_id",
    "upgrade_to_head",
    "utcnow",
]

"""Service functions behind the routes: presenting rows, idempotent creation, pagination, enqueueing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import IdempotencyKey, Tenant, utcnow

from .context import AppContext
from .errors import ApiError

log = logging.getLogger("krona.gateway")

IDEMPOTENCY_TTL = timedelta(hours=24)


# Loading a tenant's resources (another tenant's answers 404, never 403) ------------------------------


def get_owned(session: Session, model, resource_id: str, tenant: Tenant, label: str):
    row = session.get(model, resource_id)
    if row is None or row.tenant_id != tenant.id:
        raise ApiError(404, f"{label}_not_found", f"no {label} {resource_id!r}")
    return row


# Pagination: newest first, cursor = the last row's (created_at, id) --------------------------------


def encode_cursor(row) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page(
    session: Session, model, tenant: Tenant, *, limit: int, cursor: str | None, filters=()
) -> tuple[list, str | None]:
    query = select(model).where(model.tenant_id == tenant.id, *filters)
    if cursor:
        # Only what encode_cursor writes: base64url of [ISO datetime string, id string]. The length cap keeps
        # json.loads shallow; every element is type-checked before it reaches SQL.
        created_at = last_id = None
        if len(cursor) <= 512:
            try:
                value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            except (ValueError, TypeError, RecursionError):
                value = None
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                with contextlib.suppress(ValueError):
                    created_at = datetime.fromisoformat(value[0])
                if 0 < len(value[1]) <= 64 and value[1].isprintable():
                    last_id = value[1]
        if created_at is None or last_id is None:
            raise ApiError(400, "invalid_cursor", "cursor is not one this API returned; list again without it")
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        query = query.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < last_id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


# Idempotency ---------------------------------------------------------------------------------------


def request_hash(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def replay(session: Session, tenant: Tenant, key: str | None, route: str, fingerprint: str) -> tuple[int, dict] | None:
    """The stored (status, body) for a repeated Idempotency-Key, or None; 409 if reused for another request."""
    if not key:
        return None
    if len(key) > 200:
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key is limited to 200 characters")
    row = session.get(IdempotencyKey, (tenant.id, key))
    if row is None:
        return None
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    if created < utcnow() - IDEMPOTENCY_TTL:
        session.delete(row)
        session.flush()
        return None
    if row.route != route or row.request_hash != fingerprint:
        raise ApiError(409, "idempotency_key_reused", "this Idempotency-Key was used for a different request")
    return row.status_code, row.body


def commit_created(
    session: Session,
    tenant: Tenant,
    key: str | None,
    route: str,
    fingerprint: str,
    status_code: int,
    body: dict,
    on_conflict: Callable[[], None] | None = None,
) -> tuple[int, dict]:
    """Commit the new rows together with the idempotency record; a concurrent twin loses and gets the first answer."""
    if key:
        session.add(
            IdempotencyKey(
                tenant_id=tenant.id, key=key, route=route, request_hash=fingerprint, status_code=status_code, body=body
            )
        )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if on_conflict is not None:
            on_conflict()
        stored = replay(session, tenant, key, route, fingerprint)
        if stored is None:
            raise
        return stored
    return status_code, body


# Enqueueing: the row is committed first; a failed send is repaired by the reaper -------------------


def enqueue_many(context: AppContext, session: Session, model, job_ids: list[str], task: str) -> None:
    """Send one message per job, after the rows were committed with ``enqueued_at`` already set (so a create
    costs one commit). Jobs whose message could not be sent get ``enqueued_at`` cleared: the reaper sends
    them at its next pass."""
    try:
        sent = context.enqueuer.send_many(task, job_ids) if len(job_ids) > 1 else _send_one(context, task, job_ids)
    except Exception:  # the broker is down
        sent = 0
    if sent < len(job_ids):
        log.warning("could not enqueue %s (%d of %d sent); the reaper will", task, sent, len(job_ids))
    unsent = job_ids[sent:]
    if unsent:
        session.execute(update(model).where(model.id.in_(unsent)).values(enqueued_at=None))
        session.commit()


def _send_one(context: AppContext, task: str, job_ids: list[str]) -> int:
    context.enqueuer.send(task, job_ids[0])
    return 1


def enqueue(context: AppContext, session: Session, model, job_id: str, task: str) -> None:
    enqueue_many(context, session, model, [job_id], task)

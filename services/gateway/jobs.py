"""Service functions behind the routes: presenting rows, idempotent creation, pagination, enqueueing."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from shared.db import TERMINAL_STATUSES, IdempotencyKey, JobStatus, Tenant, is_id, utcnow
from shared.errors import BadRequest, Conflict, LimitExceeded, NotFound
from shared.limits import tenant_limits
from shared.queue import WEBHOOK_TASK
from shared.scheduler import is_backlogged, lift_on_submit

from .context import AppContext

log = logging.getLogger("krona.gateway")

IDEMPOTENCY_TTL = timedelta(hours=24)


# Loading a tenant's resources (another tenant's answers 404, never 403) ------------------------------


def get_owned(session: Session, model, resource_id: str, tenant: Tenant, label: str):
    """The tenant's row of ``model``; 404 for another tenant's, an unknown or a malformed id (never queried)."""
    row = session.get(model, resource_id) if is_id(resource_id) else None
    if row is None or row.tenant_id != tenant.id:
        raise NotFound(f"{label}_not_found", f"no {label} {resource_id!r}")
    return row


# Pagination: newest first, cursor = the last row's id and created_at ------------------------------------

# What the OpenAPI document states, so that every string it allows is a cursor the server accepts:
# "<id>.<created_at in microseconds since 1970 UTC>", e.g. "trn_3f2a9c0d1e2b4a5f6c7d8e9f.1795936800000000".
CURSOR_PATTERN = r"^[a-z]{3}_[0-9a-f]{24}\.[0-9]{1,16}$"
_CURSOR = re.compile(CURSOR_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# A page's size, and the status filter of the job lists.
LimitParam = Annotated[int, Query(ge=1, le=100)]
StatusParam = Annotated[str | None, Query(pattern="^(queued|running|canceling|succeeded|failed|canceled)$")]

# The pattern is documented, and checked by decode_cursor (400 invalid_cursor), not by FastAPI (422).
CursorParam = Annotated[
    str | None,
    Query(
        description="`next_cursor` of the previous page",
        json_schema_extra={"pattern": CURSOR_PATTERN, "maxLength": 64},
        examples=["trn_3f2a9c0d1e2b4a5f6c7d8e9f.1795936800000000"],
    ),
]


@dataclass(frozen=True)
class PageRequest:
    """A list route's page: its size and the cursor the previous page answered (None: the first page)."""

    limit: int
    cursor: str | None


def _page_request(limit: LimitParam = 20, cursor: CursorParam = None) -> PageRequest:
    return PageRequest(limit, cursor)


# The `limit` and `cursor` query parameters of every list route, read into one value.
Paging = Annotated[PageRequest, Depends(_page_request)]


def encode_cursor(row) -> str:
    created = row.created_at
    return f"{row.id}.{(created - _EPOCH) // timedelta(microseconds=1)}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of a cursor; 400 for anything that does not match CURSOR_PATTERN."""
    if len(cursor) > 64 or not _CURSOR.match(cursor):
        raise BadRequest("invalid_cursor", "cursor is not one this API returned; list again without it")
    last_id, micros = cursor.split(".")
    return _EPOCH + timedelta(microseconds=int(micros)), last_id


def page(session: Session, model, tenant: Tenant, paging: PageRequest, filters=()) -> tuple[list, str | None]:
    """One page of the tenant's rows of ``model`` (see page_of)."""
    query = select(model).where(model.tenant_id == tenant.id, *filters)
    return page_of(session, model, query, paging.limit, paging.cursor)


def page_of(session: Session, model, query, limit: int, cursor: str | None) -> tuple[list, str | None]:
    """One page of ``query``'s rows, newest first, after ``cursor``; and the next page's cursor (or None)."""
    if cursor is not None:  # an empty cursor is not "no cursor"
        created_at, last_id = decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < last_id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def status_filters(model, status: str | None) -> tuple:
    """Conditions for a list's ``status`` filter: ``canceling`` is a running job whose cancel was asked for."""
    if status is None:
        return ()
    if status == "canceling":
        return (model.status == JobStatus.RUNNING, model.cancel_requested.is_(True))
    if status == JobStatus.RUNNING:
        return (model.status == JobStatus.RUNNING, model.cancel_requested.is_(False))
    return (model.status == status,)


def cancel_owned(context: AppContext, session: Session, model, job_id: str, tenant: Tenant, kind: str):
    """Cancel one of the tenant's jobs (404 for another tenant's; 409 ``not_cancelable`` once it has ended) and
    return its row as it is now: ``canceled`` if it was queued, ``canceling`` (running) until its worker stops."""
    row = get_owned(session, model, job_id, tenant, kind)
    if row.status in TERMINAL_STATUSES:
        raise Conflict("not_cancelable", f"{kind} {job_id} is already {row.status}")
    cancel_jobs(context, session, model, [row.id], kind)
    session.refresh(row)
    return row


def cancel_jobs(context: AppContext, session: Session, model, job_ids: list[str], kind: str) -> None:
    """Cancel these jobs (the caller checked they are the tenant's): queued ones at once (their webhooks sent),
    running ones at their worker's next step (``cancel_requested``; they answer ``canceling`` meanwhile). Ended
    ones are left as they are. Commits."""
    now = utcnow()
    canceled = list(
        session.scalars(
            update(model)
            .where(model.id.in_(job_ids), model.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELED, finished_at=now, updated_at=now, cancel_requested=True)
            .returning(model.id)
            .execution_options(synchronize_session=False)
        )
    )
    session.execute(
        update(model)
        .where(model.id.in_(job_ids), model.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    with_webhooks = (
        session.scalars(select(model.id).where(model.id.in_(canceled), model.webhook_url.is_not(None))).all()
        if canceled
        else []
    )
    session.commit()
    for job_id in with_webhooks:
        try:
            context.enqueuer.send(WEBHOOK_TASK, f"{kind}:{job_id}")
        except Exception:  # the reaper delivers pending webhooks
            log.warning("could not send the webhook task of %s %s; the reaper will", kind, job_id)


# Answers to creates -------------------------------------------------------------------------------


def created(body: dict, status_code: int, collection: str, background=None):
    """The answer to a create (or its idempotent replay): the resource, with Location naming where it lives."""
    headers = {"Location": f"/v1/{collection}/{body['id']}"} if "id" in body else {}
    if isinstance(body, Replayed):  # as Stripe does: the client can tell a replay from a fresh create
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(dict(body), status_code=status_code, headers=headers, background=background)


# Idempotency ---------------------------------------------------------------------------------------


class Replayed(dict):
    """The stored first answer to a repeated Idempotency-Key: ``created`` marks it ``Idempotent-Replayed: true``."""


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
        raise BadRequest("invalid_idempotency_key", "Idempotency-Key is limited to 200 characters")
    row = session.get(IdempotencyKey, (tenant.id, key))
    if row is None:
        return None
    created = row.created_at
    if created < utcnow() - IDEMPOTENCY_TTL:
        session.delete(row)
        session.flush()
        return None
    if row.route != route or row.request_hash != fingerprint:
        raise Conflict("idempotency_key_reused", "this Idempotency-Key was used for a different request")
    return row.status_code, Replayed(row.body)


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


# Admission: the tenant's queued-jobs cap, and the fair scheduler's lift ---------------------------------

# What the database's insert trigger raises for a queued job over tenants.queued_cap (migrations 0007, 0008).
QUEUE_FULL_ERROR = "krona_queue_full"


@contextmanager
def admission(context: AppContext, session: Session, tenant: Tenant, model, count: int) -> Iterator[None]:
    """Wrap the adding and committing of ``count`` new queued jobs of ``model``: 429 queue_full when they do not
    fit under the tenant's cap on queued jobs (trainings, generations and evaluations); lifts the tenant's
    fair-share counter first if it had nothing queued (shared/scheduler.py: ``lift_on_submit``).

    The cap is enforced by the database (migrations 0007 and 0008): triggers keep the tenant's queued counters
    (``tenants.queued_trainings``, ``queued_generations``, ``queued_evaluations``), and the insert trigger refuses
    a job over ``tenants.queued_cap`` when the transaction commits (PostgreSQL) or at the insert (SQLite). So the
    tenant's row is locked only inside the commit, never across this request's round trips, and concurrent
    creates through any replica cannot pass the cap together. The effective cap (the tenant's override, else the
    setting) is stored on the row when it differs."""
    cap = tenant_limits(context.settings, tenant.limits).max_queued_jobs or None
    if cap is not None and count > cap:
        raise _queue_full(tenant.queued_jobs, cap, count)
    # The tenant's row was read when its key was checked (deps.authenticate): its queued counter of this queue
    # says whether it is backlogged without another query.
    backlogged = is_backlogged(tenant, model)
    if tenant.queued_cap != cap or not backlogged:
        # Outside the create's transaction, each statement committing on its own: storing the cap and lifting
        # the counter lock the tenant's rows only for a statement, so that the tenant's concurrent creates do
        # not wait for each other. Both are idempotent; a lift for a create that then fails costs nothing.
        # The request's session gives its connection back first (it has only read, or dropped an expired
        # idempotency record): a thread holds one pooled connection at a time, since the pool is as large as the
        # threadpool; holding two, 40 concurrent creates of a new tenant exhausted it and waited out its timeout.
        if session.in_transaction():
            session.commit()
        with context.autocommit_session() as own:
            if tenant.queued_cap != cap:
                own.execute(update(Tenant).where(Tenant.id == tenant.id).values(queued_cap=cap))
                tenant.queued_cap = cap
            if not backlogged:
                lift_on_submit(own, model, tenant.id, backlogged=False)
    try:
        yield
    except DBAPIError as exc:
        if QUEUE_FULL_ERROR not in str(exc.orig):
            raise
        session.rollback()
        queued = session.scalar(
            select(Tenant.queued_trainings + Tenant.queued_generations + Tenant.queued_evaluations).where(
                Tenant.id == tenant.id
            )
        )
        session.rollback()
        raise _queue_full(queued, cap or 0, count) from None


def _queue_full(queued: int, cap: int, count: int) -> LimitExceeded:
    return LimitExceeded(
        "queue_full",
        f"this tenant has {queued} queued jobs and may queue at most {cap}; "
        f"{count} more do not fit: wait for some to finish",
        {JobStatus.QUEUED: queued, "limit": cap, "requested": count},
        retry_after=10,
    )


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

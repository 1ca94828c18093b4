"""What the /v1/operator routes answer (services/gateway/routes/operator.py): the queues, the workers seen by their
leases, usage per tenant and recent failures. Read-only; each answer is a few grouped queries on the status
indexes (the console's operator pages poll them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import Evaluation, Generation, JobStatus, Tenant, Training, utcnow
from shared.queue import INFER_QUEUE, TRAIN_QUEUE
from shared.schemas import ErrorInfo
from shared.usage import report_range, usage_totals

JobKind = Literal["training", "evaluation", "generation"]
# Every kind of leased job, the queue its workers take it from, and its table.
JOB_MODELS: dict[str, tuple[str, type]] = {
    "training": (TRAIN_QUEUE, Training),
    "evaluation": (TRAIN_QUEUE, Evaluation),
    "generation": (INFER_QUEUE, Generation),
}
QUEUES = (TRAIN_QUEUE, INFER_QUEUE)


def _seconds_since(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else round(max(0.0, (now - moment).total_seconds()), 3)


def _tenant_names(session: Session, tenant_ids) -> dict[str, str]:
    ids = sorted({t for t in tenant_ids if t})
    if not ids:
        return {}
    return dict(session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids))).all())


# Queues -------------------------------------------------------------------------------------------------


class KindDepth(BaseModel):
    kind: JobKind
    queued: int
    running: int
    oldest_queued_at: datetime | None = Field(None, description="creation time of the oldest queued job")
    oldest_queued_seconds: float | None = Field(None, description="how long the oldest queued job has waited")


class TenantDepth(BaseModel):
    tenant_id: str
    tenant_name: str
    queued: int
    running: int


class QueueDepth(BaseModel):
    queue: Literal["train", "infer"]
    queued: int = Field(description="jobs waiting for a worker of this queue (all kinds)")
    running: int = Field(description="jobs a worker of this queue holds now")
    oldest_queued_seconds: float | None = Field(None, description="the longest wait among its queued jobs")
    kinds: list[KindDepth] = Field(description="the same per kind of job (trainings and evaluations share train)")
    tenants: list[TenantDepth] = Field(description="tenants with queued or running jobs here, busiest first")


class QueuesReport(BaseModel):
    as_of: datetime
    queues: list[QueueDepth]


def queue_depths(session: Session) -> QueuesReport:
    """Queued and running jobs per queue, kind and tenant, and the oldest queued job's wait: two grouped queries per
    kind of job, on the status indexes."""
    now = utcnow()
    by_kind: dict[str, list[KindDepth]] = {queue: [] for queue in QUEUES}
    by_tenant: dict[str, dict[str, dict[str, int]]] = {queue: {} for queue in QUEUES}
    for kind, (queue, model) in JOB_MODELS.items():
        counts = {JobStatus.QUEUED: 0, JobStatus.RUNNING: 0}
        oldest = None
        for status, count, first in session.execute(
            select(model.status, func.count(), func.min(model.created_at))
            .where(model.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
            .group_by(model.status)
        ):
            counts[status] = int(count)
            if status == JobStatus.QUEUED:
                oldest = first
        by_kind[queue].append(
            KindDepth(kind=kind, **counts, oldest_queued_at=oldest, oldest_queued_seconds=_seconds_since(oldest, now))
        )
        for tenant_id, status, count in session.execute(
            select(model.tenant_id, model.status, func.count())
            .where(model.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
            .group_by(model.tenant_id, model.status)
        ):
            entry = by_tenant[queue].setdefault(tenant_id, {JobStatus.QUEUED: 0, JobStatus.RUNNING: 0})
            entry[status] += int(count)
    names = _tenant_names(session, [t for queue in QUEUES for t in by_tenant[queue]])
    queues = []
    for queue in QUEUES:
        kinds = by_kind[queue]
        waits = [k.oldest_queued_seconds for k in kinds if k.oldest_queued_seconds is not None]
        tenants = sorted(
            (TenantDepth(tenant_id=t, tenant_name=names.get(t, t), **counts) for t, counts in by_tenant[queue].items()),
            key=lambda d: (-(d.queued + d.running), d.tenant_name),
        )
        queues.append(
            QueueDepth(
                queue=queue,
                queued=sum(k.queued for k in kinds),
                running=sum(k.running for k in kinds),
                oldest_queued_seconds=max(waits) if waits else None,
                kinds=kinds,
                tenants=tenants,
            )
        )
    return QueuesReport(as_of=now, queues=queues)


# Workers ------------------------------------------------------------------------------------------------


class WorkerSeen(BaseModel):
    owner: str = Field(description="the lease owner: host:pid:random, unique per worker process")
    host: str
    pid: int | None = None
    queues: list[Literal["train", "infer"]]
    jobs: int = Field(description="running jobs it holds the lease of")
    kinds: dict[str, int] = Field(description="those jobs per kind")
    lease_expires_at: datetime | None = Field(None, description="the latest expiry among its leases")
    lease_live: bool = Field(
        description="false when every lease it holds has expired: the worker stopped renewing (crashed or "
        "stuck); the reaper hands such jobs to another worker"
    )


class WorkersReport(BaseModel):
    as_of: datetime
    workers: list[WorkerSeen]


def workers_seen(session: Session) -> WorkersReport:
    """The lease owners of running jobs, with their jobs per kind and their latest lease expiry (one grouped query
    per kind of job)."""
    now = utcnow()
    seen: dict[str, dict] = {}
    for kind, (queue, model) in JOB_MODELS.items():
        for owner, count, expires in session.execute(
            select(model.lease_owner, func.count(), func.max(model.lease_expires_at))
            .where(model.status == JobStatus.RUNNING, model.lease_owner.is_not(None))
            .group_by(model.lease_owner)
        ):
            entry = seen.setdefault(owner, {"queues": set(), "kinds": {}, "jobs": 0, "expires": None})
            entry["queues"].add(queue)
            entry["kinds"][kind] = int(count)
            entry["jobs"] += int(count)
            expires = expires
            if expires is not None and (entry["expires"] is None or expires > entry["expires"]):
                entry["expires"] = expires
    workers = []
    for owner, entry in sorted(seen.items()):
        host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        workers.append(
            WorkerSeen(
                owner=owner,
                host=host,
                pid=int(pid_text) if pid_text.isdigit() else None,
                queues=sorted(entry["queues"], key=QUEUES.index),
                jobs=entry["jobs"],
                kinds=entry["kinds"],
                lease_expires_at=entry["expires"],
                lease_live=entry["expires"] is not None and entry["expires"] > now,
            )
        )
    return WorkersReport(as_of=now, workers=workers)


# Usage --------------------------------------------------------------------------------------------------


class TenantUsage(BaseModel):
    tenant_id: str
    tenant_name: str
    kind: Literal["training", "generation", "evaluation"]
    jobs: int
    worker_seconds: float
    images: int
    steps: int
    pixels: int
    devices: dict[str, float]


class OperatorUsageReport(BaseModel):
    start: str
    end: str
    data: list[TenantUsage] = Field(description="per tenant and kind, the most worker time first")


def usage_per_tenant(session: Session, start: str | None, end: str | None) -> OperatorUsageReport:
    """Every tenant's usage totals per kind over the range (default: the last 30 days); 400 invalid_range as
    `GET /v1/usage` answers it."""
    first, last = report_range(start, end)
    totals = usage_totals(session, None, first, last, "total")
    names = _tenant_names(session, [entry["tenant_id"] for entry in totals])
    data = [
        TenantUsage(**{k: v for k, v in entry.items() if k != "period"}, tenant_name=names.get(entry["tenant_id"], ""))
        for entry in totals
    ]
    data.sort(key=lambda u: (-u.worker_seconds, u.tenant_name, u.kind))
    return OperatorUsageReport(start=first.isoformat(), end=last.isoformat(), data=data)


# Failures -----------------------------------------------------------------------------------------------

MAX_MESSAGE_CHARS = 2000


class Failure(BaseModel):
    kind: JobKind
    id: str
    tenant_id: str
    tenant_name: str
    error: ErrorInfo
    attempts: int
    created_at: datetime
    finished_at: datetime | None = None


class FailuresReport(BaseModel):
    data: list[Failure] = Field(description="newest first")


def recent_failures(session: Session, limit: int, kind: str | None) -> FailuresReport:
    """The ``limit`` failed jobs (of one ``kind``, or every kind) that ended last: ``limit`` rows per kind at most,
    merged newest first."""
    found = []
    for job_kind, (_, model) in JOB_MODELS.items():
        if kind is not None and job_kind != kind:
            continue
        rows = session.execute(
            select(
                model.id,
                model.tenant_id,
                model.error_code,
                model.error_message,
                model.attempts,
                model.created_at,
                model.finished_at,
            )
            .where(model.status == JobStatus.FAILED)
            .order_by(model.finished_at.desc().nulls_last(), model.id.desc())
            .limit(limit)
        )
        found += [(job_kind, *row) for row in rows]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    found.sort(key=lambda r: (r[7] or r[6] or epoch, r[1]), reverse=True)
    found = found[:limit]
    names = _tenant_names(session, [r[2] for r in found])
    data = [
        Failure(
            kind=job_kind,
            id=job_id,
            tenant_id=tenant_id,
            tenant_name=names.get(tenant_id, ""),
            error=ErrorInfo(code=code or "unknown", message=(message or "")[:MAX_MESSAGE_CHARS]),
            attempts=attempts or 0,
            created_at=created,
            finished_at=finished,
        )
        for job_kind, job_id, tenant_id, code, message, attempts, created, finished in found
    ]
    return FailuresReport(data=data)

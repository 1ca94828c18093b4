"""/v1/operator: what an operator of the service watches, for an admin key only: the queues, the workers seen by
their leases, usage per tenant and recent failures (services/gateway/services/operator.py answers them)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import AuthenticatedRoute, CurrentAdmin, SessionDep
from ..jobs import LimitParam
from ..openapi import errors
from ..services.operator import (
    FailuresReport,
    JobKind,
    OperatorUsageReport,
    QueuesReport,
    WorkersReport,
    queue_depths,
    recent_failures,
    usage_per_tenant,
    workers_seen,
)
from .tenants import ADMIN_ONLY
from .usage import EndDay, StartDay

router = APIRouter(
    route_class=AuthenticatedRoute,
    prefix="/v1/operator",
    tags=["operator"],
    responses={**errors(401, 422, 503), **ADMIN_ONLY},
)


# Routes -----------------------------------------------------------------------------------------------------


@router.get("/queues", response_model=QueuesReport, summary="Queue depth and running jobs per queue")
def get_queues(session: SessionDep, admin: CurrentAdmin):
    """Per queue (`train`: trainings and evaluations; `infer`: generations): queued and running jobs, per kind and
    per tenant, and how long the oldest queued job has waited."""
    return queue_depths(session)


@router.get("/workers", response_model=WorkersReport, summary="Workers seen by the leases of running jobs")
def get_workers(session: SessionDep, admin: CurrentAdmin):
    """Each worker process that holds the lease of a running training, evaluation or generation, with its jobs and
    its latest lease expiry. An idle worker holds no lease and so is not listed (its liveness is its queue's
    broker connection, which the gateway does not see)."""
    return workers_seen(session)


@router.get("/usage", response_model=OperatorUsageReport, summary="Usage per tenant", responses=errors(400))
def get_usage_per_tenant(
    session: SessionDep,
    admin: CurrentAdmin,
    start: StartDay = None,
    end: EndDay = None,
):
    """Every tenant's totals over the range (366 days at most), per kind of job, as `GET /v1/usage` counts them;
    the most worker time first."""
    return usage_per_tenant(session, start, end)


@router.get("/failures", response_model=FailuresReport, summary="Recent failed jobs of every kind")
def get_failures(
    session: SessionDep,
    admin: CurrentAdmin,
    limit: LimitParam = 20,
    kind: JobKind | None = None,
):
    """The most recently ended failed trainings, evaluations and generations (or those of one `kind`), with their
    error code and message and their tenant."""
    return recent_failures(session, limit, kind)

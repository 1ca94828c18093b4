"""Metering on the worker side: the usage record of a finished job (added to the transaction that finishes it)
and per-tenant Prometheus counters with a bounded number of label values.

The counters are served with the worker's other metrics (``KRONA_WORKER_METRICS_PORT``). A process names at
most ``KRONA_METRICS_MAX_TENANTS`` tenants in its labels (the first ones it serves); the others are counted
under ``tenant="other"``, so that no number of tenants can grow the series without bound. The database's
usage records (``GET /v1/usage``) are the complete, per-tenant truth.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter
from sqlalchemy.orm import Session

from shared.db import JobStatus
from shared.usage import Usage, new_record

__all__ = ["TenantLabels", "count_usage", "record_usage"]

KINDS = ("training", "generation", "evaluation")
WORKER_SECONDS = Counter("krona_tenant_worker_seconds", "worker seconds spent on a tenant's jobs", ["tenant", "kind"])
JOBS = Counter("krona_tenant_jobs", "a tenant's finished jobs", ["tenant", "kind", "status"])
IMAGES = Counter("krona_tenant_images", "images generated for a tenant", ["tenant"])
STEPS = Counter("krona_tenant_steps", "denoising or training steps run for a tenant", ["tenant", "kind"])
STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class TenantLabels:
    """The label value of a tenant: its id for the first ``limit`` tenants seen, then ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.named: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, tenant_id: str) -> str:
        with self.lock:
            if tenant_id in self.named:
                return tenant_id
            if len(self.named) < self.limit:
                self.named.add(tenant_id)
                return tenant_id
        return "other"


_labels: TenantLabels | None = None


def _label(limit: int, tenant_id: str) -> str:
    global _labels
    if _labels is None:
        _labels = TenantLabels(limit)
    return _labels(tenant_id)


def record_usage(session: Session, *, tenant_id: str, kind: str, job_id: str, status: str, usage: Usage) -> None:
    """Add the job's usage record to ``session``: the caller commits it with the job's final status."""
    session.add(new_record(tenant_id, kind, job_id, status, usage))


def count_usage(*, tenant_id: str, kind: str, status: str, usage: Usage, max_tenants: int) -> None:
    """The Prometheus side of a committed usage record."""
    tenant = _label(max_tenants, tenant_id)
    WORKER_SECONDS.labels(tenant, kind).inc(max(0.0, usage.worker_seconds))
    JOBS.labels(tenant, kind, status if status in STATUSES else JobStatus.FAILED).inc()
    STEPS.labels(tenant, kind).inc(usage.steps)
    if usage.images:
        IMAGES.labels(tenant).inc(usage.images)

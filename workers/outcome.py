"""How every job ends: one function for trainings, generations and evaluations.

A job's outcome is written by the worker that holds its lease, and only by it: the terminal status (with its
result or error), any row that must appear with it (a training's adapter) and the usage record commit in one
transaction, retried whole through a database outage (workers/transient.py). Only once that commit is made
are the Prometheus counters counted and the webhook sent, so a job that another worker took over (its lease
expired) is neither charged nor announced twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from shared.usage import Usage

from .lease import finish, renew
from .runtime import Runtime
from .transient import retry_transient
from .usage import count_usage, record_usage
from .webhooks import notify

__all__ = ["end_job"]

log = logging.getLogger("krona.worker")

MAX_ERROR_CHARS = 2000


def end_job(
    rt: Runtime,
    model,
    job_id: str,
    *,
    kind: str,
    tenant_id: str,
    status: str,
    usage: Usage,
    with_status: Callable[[Session], None] | None = None,
    renew_lease: int | None = None,
    webhook: bool = True,
    **values: Any,
) -> bool:
    """End ``job_id`` (a row of ``model``) as ``status`` with ``values`` (its result or error columns) and
    ``usage``, if this worker still owns it: True once committed, counted and announced; False when another
    worker owns it now (nothing written). DependencyUnavailable when the database stays away past the retry
    window (the lease then expires and the reaper hands the job on).

    with_status: adds what commits with the status, in the same session (a training's adapter row).
    renew_lease: renew the lease for that many seconds first, so that a job whose lease lapsed during a long
        last step is not ended by a worker that no longer owns it.
    webhook: send the job's webhook (if it has one) after the commit.
    """
    if "error_message" in values and values["error_message"] is not None:
        values["error_message"] = values["error_message"][:MAX_ERROR_CHARS]

    def write() -> bool:
        with rt.sessions() as session:
            if renew_lease is not None and not renew(session, model, job_id, rt.owner, renew_lease):
                return False
            if with_status is not None:
                with_status(session)
            if not finish(session, model, job_id, rt.owner, status, commit=False, **values):
                session.rollback()
                return False
            record_usage(session, tenant_id=tenant_id, kind=kind, job_id=job_id, status=status, usage=usage)
            session.commit()
            return True

    window = rt.settings.transient_retry_seconds
    if not retry_transient(write, what=f"{kind} {job_id}: record the {status} status", window_seconds=window):
        log.warning("%s %s: no longer this worker's; its %s status was not written", kind, job_id, status)
        return False
    count_usage(tenant_id=tenant_id, kind=kind, status=status, usage=usage, max_tenants=rt.settings.metrics_max_tenants)
    if webhook:
        notify(rt, model, kind, job_id)
    return True

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from shared.supervision import read_process_states

from ..deps import ContextDep
from ..errors import ApiError, error_body
from ..openapi import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", summary="Database, broker and storage are reachable", responses=errors(503))
def readyz(context: ContextDep):
    """Readiness: the database, the broker and storage answer (503 names the part that does not); under
    `krona up`, also the state of its worker processes."""
    checks: dict[str, str] = {}
    try:
        with context.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        context.enqueuer.check()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc.__class__.__name__}"
    try:
        context.storage.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {exc.__class__.__name__}"
    # Under `krona up`: whether its worker processes run or are being restarted (information only; the
    # gateway can take requests either way, and jobs wait in the queue).
    processes = read_process_states(context.settings.data_dir.resolve())
    extra = {} if processes is None else {"processes": processes}
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks, **extra}
    return JSONResponse(error_body("not_ready", "a dependency is unreachable", {**checks, **extra}), status_code=503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="With KRONA_METRICS_TOKEN set, send `Authorization: Bearer <token>`. Without it the route is "
    "open in dev and disabled (404) in prod.",
    response_class=Response,
    responses=errors(401, 404),
)
def metrics(request: Request, context: ContextDep):
    """Prometheus metrics (requests by method, route template and status; latency)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    token = context.settings.metrics_token
    if not token:
        if context.settings.env == "prod":
            raise ApiError(
                404,
                "metrics_disabled",
                "/metrics is disabled in production until KRONA_METRICS_TOKEN is set "
                "(then scrape it with 'Authorization: Bearer <token>')",
            )
    else:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <KRONA_METRICS_TOKEN>'")

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # `krona gateway --workers N`: the sum over processes
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

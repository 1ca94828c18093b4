"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import ContextDep
from ..errors import error_body

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Database, broker and storage are reachable")
def readyz(context: ContextDep):
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
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    return JSONResponse(error_body("not_ready", "a dependency is unreachable", checks), status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics():
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

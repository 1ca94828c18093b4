"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from shared.db import KeyRole
from shared.supervision import read_process_states

from ..deps import ContextDep, authenticate
from ..errors import ApiError, error_body
from ..openapi import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


def _bearer_token(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def _token(context) -> str | None:
    token = context.settings.metrics_token
    return token.get_secret_value() if token is not None else None


def _is_metrics_token(given: str | None, token: str | None) -> bool:
    return bool(given and token) and hmac.compare_digest(given.encode(), token.encode())


def _may_see_details(request: Request, context) -> bool:
    """Whether the caller may see /readyz's details: it sends KRONA_METRICS_TOKEN or an admin API key."""
    given = _bearer_token(request)
    if given is None:
        return False
    if _is_metrics_token(given, _token(context)):
        return True
    try:
        return authenticate(context, given, charge=False).role == KeyRole.ADMIN
    except Exception:  # not a key, a tenant's key, or the database is down: the public answer
        return False


@router.get(
    "/readyz",
    summary="Database, broker and storage are reachable",
    description="Public answer: `ready`, or 503 naming each dependency `ok` or `error`. `require` (comma-separated "
    "subset of database, broker, storage; default all three) says which must be up for `ready`: the Kubernetes "
    "readiness probe asks for the database only, so that an S3 or broker outage does not take every gateway pod "
    "out of the Service (reads need only the database; creates answer 503 for the part that is down). Every "
    "dependency is still checked and reported. With `Authorization: Bearer <KRONA_METRICS_TOKEN>` or an admin "
    "API key the answer adds each error's class and, under `krona up`, the state of its worker processes "
    "(`processes`).",
    responses=errors(422, 503),
)
def readyz(
    request: Request,
    context: ContextDep,
    require: Annotated[
        str,
        Query(
            pattern=r"^(database|broker|storage)(,(database|broker|storage))*$",
            description="the dependencies that must answer for 200",
            examples=["database"],
        ),
    ] = "database,broker,storage",
):
    """Readiness: the required dependencies answer (503 names the part that does not)."""
    required = set(require.split(","))
    checks, causes = _check_dependencies(context)
    extra: dict = {}
    if _may_see_details(request, context):  # probes send no key: no lookup for them
        checks = {name: f"error: {causes[name]}" if name in causes else "ok" for name in checks}
        # Under `krona up`: whether its worker processes run or are being restarted (information only; the
        # gateway can take requests either way, and jobs wait in the queue).
        processes = read_process_states(context.settings.data_dir.resolve())
        extra = {} if processes is None else {"processes": processes}
    if not required & set(causes):
        return {"status": "ready", "checks": checks, **extra}
    return JSONResponse(error_body("not_ready", "a dependency is unreachable", {**checks, **extra}), status_code=503)


def _check_dependencies(context) -> tuple[dict[str, str], dict[str, str]]:
    """({dependency: ok|error}, {dependency: the error's class}) for the database, the broker and storage."""
    checks: dict[str, str] = {}
    causes: dict[str, str] = {}
    for name, check in (
        ("database", lambda: _ping_database(context)),
        ("broker", context.enqueuer.check),
        ("storage", context.storage.check),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = "error"
            causes[name] = exc.__class__.__name__
    return checks, causes


def _ping_database(context) -> None:
    context.ping_database()


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

    token = _token(context)
    if not token:
        if context.settings.env == "prod":
            raise ApiError(
                404,
                "metrics_disabled",
                "/metrics is disabled in production until KRONA_METRICS_TOKEN is set "
                "(then scrape it with 'Authorization: Bearer <token>')",
            )
    elif not _is_metrics_token(_bearer_token(request), token):
        raise ApiError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <KRONA_METRICS_TOKEN>'")

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # `krona gateway --workers N`: the sum over processes
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

"""The FastAPI application: `create_app()` wires settings, database, storage and the broker.

Run it with ``uvicorn --factory services.gateway.app:create_app`` (``krona up`` does). It refuses to
start on a database that is not at the migration head.
"""

from __future__ import annotations

import contextlib
import json
import logging

import anyio.to_thread
from fastapi import FastAPI

from shared.db import Training, check_migrated, make_engine, make_session_factory
from shared.schemas import queue_positions, training_public
from shared.settings import Settings, get_settings
from shared.storage import Storage, storage_from_settings

from .context import AppContext, CeleryEnqueuer, Enqueuer
from .docs import install_docs
from .errors import install_error_handlers
from .events import ProgressHub
from .middleware import BodySizeLimit, RequestContext
from .openapi import camel_case_operation_id, install_openapi
from .routes import (
    adapters,
    capabilities,
    console,
    generations,
    health,
    keys,
    operator,
    tenants,
    trainings,
    usage,
    webhooks,
)

log = logging.getLogger("krona.gateway")

DESCRIPTION = """
Personalize Stable Diffusion with DiffuseKronA (Kronecker-product) adapters.

Authenticate with `Authorization: Bearer <api key>`. Errors are
`{"error": {"code": "...", "message": "...", "details": ...}}`. Creating routes accept an
`Idempotency-Key` header: the same key from the same tenant returns the first answer (24 h).
A resource of another tenant answers 404.

Keys are a tenant's (its own resources, `/v1/api-keys`, `/v1/usage`) or an admin's (`/v1/tenants`);
the other kind answers 403. Each key has a token bucket (requests per second and burst, per-tenant
overrides): every authenticated answer carries `RateLimit-Limit`, `RateLimit-Remaining` and
`RateLimit-Reset`, and an empty bucket answers 429 `rate_limited` with `Retry-After`. A tenant's
queued jobs are capped (429 `queue_full`). Workers serve tenants fairly: the next job comes from the
tenant served least so far, weighted by its share, with service counted as the jobs' cost.
"""


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int = logging.INFO) -> None:
    """One JSON object per line on stderr, with the request id on request lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("krona")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def _training_snapshot(context: AppContext, training_id: str) -> dict | None:
    """The training's public body, or None when its row is gone (deleted, or its tenant was)."""
    with context.sessions() as session:
        row = session.get(Training, training_id)
        if row is None:
            return None
        position = queue_positions(session, Training, row.tenant_id, [row]).get(row.id)
        return training_public(row, position, context.settings.public_url)


def create_app(
    settings: Settings | None = None, *, enqueuer: Enqueuer | None = None, storage: Storage | None = None
) -> FastAPI:
    settings = settings or get_settings()
    # Sync routes and dependencies run in the threadpool; one connection per thread at most, so a pool
    # as large as the threadpool means no thread ever waits for a connection (ARCHITECTURE.md).
    engine = make_engine(
        settings.resolved_database_url,
        pool_size=settings.gateway_threads + 4,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_seconds,
        pre_ping=False,
    )
    check_migrated(engine)
    context = AppContext(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        storage=storage or storage_from_settings(settings),
        enqueuer=enqueuer or CeleryEnqueuer(settings),
    )
    context.progress = ProgressHub(
        lambda training_id: _training_snapshot(context, training_id),
        interval=settings.event_poll_interval_seconds,
        max_streams_per_tenant=settings.max_event_streams_per_tenant,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.gateway_threads
        yield
        engine.dispose()

    app = FastAPI(
        title="Krona",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=camel_case_operation_id,
        docs_url=None,  # served from local files: services/gateway/docs.py
        redoc_url=None,
    )
    app.state.context = context
    install_openapi(app)
    install_docs(app)
    install_error_handlers(app)
    for router in (
        capabilities.router,
        trainings.router,
        adapters.router,
        generations.router,
        webhooks.router,
        keys.router,
        tenants.router,
        usage.router,
        operator.router,
        console.router,
        health.router,
    ):
        app.include_router(router)

    # Outermost first: the request id and metrics see every answer, including the body limit's 413.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestContext)
    return app


def create_served_app() -> FastAPI:
    """The factory `krona gateway` serves (in every worker process): JSON logs, then the app."""
    configure_logging()
    return create_app()

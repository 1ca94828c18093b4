"""What a worker process holds: settings, database sessions, storage, its identity, cached pipelines."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from shared import queue
from shared.db import check_migrated, make_engine, make_session_factory
from shared.settings import Settings, get_settings
from shared.storage import Storage, storage_from_settings

from .lease import worker_identity


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    owner: str
    # One pipeline per base model, kept for the life of the process (loading is the slow part).
    pipelines: dict[str, Any] = field(default_factory=dict)

    def send(self, task: str, job_id: str, *, countdown: float | None = None) -> None:
        queue.send(queue.celery_app(), task, job_id, countdown=countdown)  # looked up at the call (tests patch it)


def build_runtime(settings: Settings | None = None, storage: Storage | None = None) -> Runtime:
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)
    check_migrated(engine)
    return Runtime(
        settings=settings,
        sessions=make_session_factory(engine),
        storage=storage or storage_from_settings(settings),
        owner=worker_identity(),
    )


@lru_cache
def runtime() -> Runtime:
    """The process's runtime, built on first use (the worker checks the database at start)."""
    return build_runtime()

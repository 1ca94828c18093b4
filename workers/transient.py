"""Transient dependency faults inside a job: retried with backoff, so an outage delays a job but does not fail it.

A storage or database call that fails because the service is unreachable is tried again (0.5 s,
doubling to 10 s) for up to ``KRONA_TRANSIENT_RETRY_SECONDS``; only then does the job fail, with
``storage_unavailable`` or ``database_unavailable`` as its error code. A missing blob or a bug is not
transient and is raised at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from shared.storage import BlobNotFound, StorageError

log = logging.getLogger("krona.worker")

__all__ = ["DependencyUnavailable", "fault_code", "retry_transient"]

T = TypeVar("T")


class DependencyUnavailable(Exception):
    """A dependency stayed unreachable for the whole retry window; ``code`` names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def fault_code(exc: BaseException) -> str | None:
    """``storage_unavailable`` / ``database_unavailable`` for a transient fault, None for anything else."""
    if isinstance(exc, StorageError) and not isinstance(exc, BlobNotFound):
        return "storage_unavailable"
    if isinstance(exc, OperationalError | PoolTimeout):
        return "database_unavailable"
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return "database_unavailable"
    return None


def retry_transient(call: Callable[[], T], *, what: str, window_seconds: float) -> T:
    """``call()``, tried again on transient faults for up to ``window_seconds``; DependencyUnavailable after."""
    start = time.monotonic()
    delay = 0.5
    failures = 0
    while True:
        try:
            result = call()
        except Exception as exc:
            code = fault_code(exc)
            if code is None:
                raise
            failures += 1
            waited = time.monotonic() - start
            if waited + delay > window_seconds:
                raise DependencyUnavailable(
                    code, f"{what}: {code.replace('_', ' ')} for {waited:.0f} s ({exc})"
                ) from exc
            if failures == 1:
                log.warning(
                    "%s: %s (%s); retrying for up to %.0f s", what, code, exc.__class__.__name__, window_seconds
                )
            time.sleep(delay)
            delay = min(10.0, delay * 2)
            continue
        if failures:
            log.warning("%s: recovered after %d retries", what, failures)
        return result

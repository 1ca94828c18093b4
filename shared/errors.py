"""What the service's logic tells a client went wrong, without knowing HTTP.

Service functions (services/gateway/services/, shared/) raise these; the gateway maps each kind to its HTTP status
once (services/gateway/errors.py: ``STATUS_OF``), and the CLI and other callers print the message. Each carries a
stable ``code`` (what clients branch on), a ``message`` for people, optional ``details``, and, for the kinds a
client should retry, ``retry_after`` seconds.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "Invalid",
    "LimitExceeded",
    "NotFound",
    "ServiceError",
    "TooLarge",
    "Unavailable",
    "UnsupportedMedia",
]


class ServiceError(Exception):
    """An outcome the client must be told about: ``code``, ``message``, ``details``, ``retry_after`` seconds."""

    def __init__(
        self,
        code: str,
        message: str,
        details: Any = None,
        *,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after
        self.headers = headers  # extra response headers a limit reports (RateLimit-*); most errors have none


class BadRequest(ServiceError):
    """The request is malformed (a cursor or key the API never made)."""


class Forbidden(ServiceError):
    """The caller's key may not do this (its role)."""


class NotFound(ServiceError):
    """No such resource for this tenant (another tenant's resources are not found either)."""


class Conflict(ServiceError):
    """The resource's state does not allow this now (active, ended, reused key)."""


class TooLarge(ServiceError):
    """A file, request or batch over its size limit."""


class UnsupportedMedia(ServiceError):
    """A file in a format the service does not take."""


class Invalid(ServiceError):
    """A value the service refuses (out of range, not servable, over a compute cap)."""


class LimitExceeded(ServiceError):
    """A rate or quota limit: retry after ``retry_after`` seconds."""


class Unavailable(ServiceError):
    """A dependency is down or busy: retry after ``retry_after`` seconds."""

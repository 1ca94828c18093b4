"""Errors of the Krona API as exceptions, one class per HTTP status.

Every answer of the API that is not a success carries ``{"error": {"code", "message", "details"}}`` and an
``X-Request-ID`` header; both are kept on the exception, so a bug report can name the request.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequest",
    "Conflict",
    "Gone",
    "InvalidRequest",
    "JobFailedError",
    "KronaError",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "UnsupportedMedia",
    "WaitTimeoutError",
    "error_from_response",
    "parse_retry_after",
]


class KronaError(Exception):
    """An answer of the API that is not a success, or a failure to get one.

    ``status`` (HTTP status, None without an answer), ``code`` (the API's error code, e.g. ``training_not_found``),
    ``details`` (the API's extra data), ``request_id`` (the ``X-Request-ID`` of the answer).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message


class BadRequest(KronaError):
    """400: a malformed request (e.g. a bad cursor or date range)."""


class AuthenticationError(KronaError):
    """401: no API key, an unknown one or a revoked one."""


class PermissionDenied(KronaError):
    """403: the key's role does not allow the route (a tenant key on /v1/tenants, an admin key on a tenant route)."""


class NotFound(KronaError):
    """404: no such resource for this tenant (another tenant's resources answer 404 too)."""


class Conflict(KronaError):
    """409: the resource's state refuses the request (cancel an ended job, delete a running one, a reused
    Idempotency-Key with another body, a tenant name taken)."""


class Gone(KronaError):
    """410: the generated images were deleted after the server's retention time."""


class PayloadTooLarge(KronaError):
    """413: too many images, a file too large, a batch too large."""


class UnsupportedMedia(KronaError):
    """415: an image or adapter file that is not of an accepted type."""


class InvalidRequest(KronaError):
    """422: a value the API refuses (unknown params, factor sizes that do not divide the model, limits)."""


class RateLimited(KronaError):
    """429: over the key's rate limit, the tenant's queue cap or its event streams; retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(KronaError):
    """5xx: the server failed (other than 503)."""


class ServiceUnavailable(ServerError):
    """503: a dependency of the server is down (database, broker, storage); retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class APIConnectionError(KronaError):
    """No answer: the server could not be reached, or the connection broke. ``url``: the server's base URL."""

    url: str | None = None


class APITimeoutError(APIConnectionError):
    """No answer in time (the client's ``timeout``)."""


class WaitTimeoutError(KronaError):
    """A ``wait(..., timeout=)`` ended before the job did; ``resource`` is the last state seen (the job goes on)."""

    def __init__(self, message: str, *, resource: Any = None) -> None:
        super().__init__(message)
        self.resource = resource


class JobFailedError(KronaError):
    """``client.generate`` (or another call that needs a success) saw the job end failed or canceled."""

    def __init__(self, message: str, *, resource: Any = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.resource = resource


_BY_STATUS: dict[int, type[KronaError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMedia,
    422: InvalidRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_response(response: httpx.Response) -> KronaError:
    """The exception for an answer that is not a success, from its error envelope (or its text)."""
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    code = details = None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError, httpx.ResponseNotRead):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code, details = error.get("code"), error.get("details")
        message = str(error.get("message") or code or f"HTTP {status}")
    else:
        try:
            text = response.text.strip()
        except (httpx.ResponseNotRead, UnicodeDecodeError):
            text = ""
        message = f"HTTP {status}" + (f": {text[:300]}" if text else "")
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else KronaError)
    kwargs: dict[str, Any] = {"status": status, "code": code, "details": details, "request_id": request_id}
    if cls in (RateLimited, ServiceUnavailable):
        kwargs["retry_after"] = parse_retry_after(response.headers.get("retry-after"))
    return cls(message, **kwargs)

"""The one error shape of the API: {"error": {"code", "message", "details"}} with the fitting status."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    LimitExceeded,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
    UnsupportedMedia,
)
from shared.storage import StorageError

__all__ = ["STATUS_OF", "ApiError", "error_body", "install_error_handlers", "status_of"]

# Each kind of the domain's errors (shared/errors.py) and its HTTP status: the one place they meet.
STATUS_OF: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    UnsupportedMedia: 415,
    Invalid: 422,
    LimitExceeded: 429,
    Unavailable: 503,
}


class ApiError(ServiceError):
    """An error of the HTTP layer itself (authentication, the body's media type, routing), with its ``status``.
    Service functions raise the domain's kinds instead (shared/errors.py)."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code, message, details, headers=headers)
        self.status = status


def status_of(exc: ServiceError) -> int:
    """The HTTP status of a domain error (or an ApiError's own)."""
    if isinstance(exc, ApiError):
        return exc.status
    return next((status for kind, status in STATUS_OF.items() if isinstance(exc, kind)), 500)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


RETRY_AFTER_SECONDS = 5


def _dbapi_handler(unavailable_handler):
    """DBAPIError: a lost connection is a dependency fault (503); anything else is a bug (500, logged)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        if getattr(exc, "connection_invalidated", False):
            return await unavailable_handler(request, exc)
        logging.getLogger("krona.gateway").exception("database error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal error; see the gateway log"), status_code=500)

    return handler


def _allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document lists for this path (HEAD where GET is)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _expects_multipart(request: Request) -> bool:
    """Whether the matched route takes a form with files (FastAPI `File` parameters)."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    return body_field is not None and isinstance(getattr(body_field, "field_info", None), params.File)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        status = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else dict(exc.headers or {})
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if status == 503:
            headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Authentication came first (deps.AuthenticatedRoute checks the key before the body is read): an
        # unauthenticated request never learns what the body should be.
        if _expects_multipart(request) and not request.headers.get("content-type", "").startswith("multipart/"):
            # FastAPI reads any other body as an empty form; say what is wrong, not which fields are missing.
            return JSONResponse(
                error_body("unsupported_media_type", "send multipart/form-data (see the operation's requestBody)"),
                status_code=415,
            )
        details = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":  # its location is a character offset, not a field
                reason = (err.get("ctx") or {}).get("error", "")
                details.append({"field": "", "message": f"the body is not valid JSON ({reason})".replace(" ()", "")})
                continue
            field = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            details.append({"field": field, "message": err.get("msg", "")})
        first = details[0] if details else {"field": "", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return JSONResponse(error_body("invalid_request", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    # Dependency faults: 503 with what is down and when to retry, one log line, no traceback. (These
    # handlers run in Starlette's ExceptionMiddleware; the catch-all below is re-raised to the server's log.)

    def unavailable(code: str, what: str):
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            logging.getLogger("krona.gateway").warning(
                "%s %s: %s (%s)", request.method, request.url.path, what, exc.__class__.__name__
            )
            return JSONResponse(
                error_body(code, f"{what}; try again shortly"),
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

        return handler

    for exc_class in (OperationalError, PoolTimeout):
        app.add_exception_handler(exc_class, unavailable("database_unavailable", "the database is unreachable"))
    app.add_exception_handler(DBAPIError, _dbapi_handler(unavailable("database_unavailable", "the database failed")))
    app.add_exception_handler(StorageError, unavailable("storage_unavailable", "storage is unreachable"))
    app.add_exception_handler(BrokerError, unavailable("broker_unavailable", "the broker is unreachable"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("krona.gateway").exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal error; see the gateway log"), status_code=500)

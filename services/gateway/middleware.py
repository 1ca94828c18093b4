"""ASGI middleware of the gateway: request ids, security headers, metrics and logs; the body limit, for streamed
bodies too.

Both are plain ASGI classes (not Starlette's BaseHTTPMiddleware, which runs each request through an
extra task and memory streams and costs about a millisecond of CPU per request).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

__all__ = ["NOSNIFF", "NO_STORE", "BodySizeLimit", "RequestContext", "metric_labels"]

log = logging.getLogger("krona.gateway")

REQUESTS = Counter("krona_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("krona_http_request_seconds", "HTTP request latency", ["method", "route"])
# Label values come from fixed sets, so that no client can add series to /metrics.
METRIC_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def metric_labels(scope: Scope) -> tuple[str, str]:
    """(method, route): any other method name is ``other``; the route is the matched route's path template
    (never the raw path), else ``unmatched``."""
    method = scope.get("method", "")
    route = getattr(scope.get("route"), "path", None)
    return (method if method in METRIC_METHODS else "other"), (route if isinstance(route, str) else "unmatched")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 200 and text.isprintable():
                return text
            break
    return uuid.uuid4().hex


# Security headers, built once. Every answer: no MIME sniffing (an uploaded file or an error body is never run as
# HTML or script). Answers that may hold a tenant's data or the server's state (everything under /v1, /readyz,
# /metrics) and every error: no-store, so that no browser or proxy cache keeps them.
NOSNIFF = (b"x-content-type-options", b"nosniff")
NO_STORE = (b"cache-control", b"no-store")
NO_STORE_PREFIXES = ("/v1/", "/readyz", "/metrics")
# Header names these replace if a route set them too (one value each, never two).
OURS = (NOSNIFF[0],)
OURS_NO_STORE = (NOSNIFF[0], NO_STORE[0])
INTERNAL_ERROR_BODY = json.dumps(error_body("internal_error", "internal error; see the gateway log")).encode()


def _no_store_path(path: str) -> bool:
    return path == "/v1" or path.startswith(NO_STORE_PREFIXES)


class RequestContext:
    """X-Request-ID on every answer (the client's, or a new one), the key's RateLimit-* headers on authenticated
    answers, X-Content-Type-Options: nosniff on every answer and Cache-Control: no-store on /v1, /readyz, /metrics
    and errors, Prometheus metrics and one JSON log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        header = (b"x-request-id", request_id.encode())
        private = _no_store_path(scope.get("path", ""))
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                no_store = private or status >= 400
                ours = OURS_NO_STORE if no_store else OURS
                headers = [item for item in message.get("headers", ()) if item[0].lower() not in ours]
                headers += [header, NOSNIFF, NO_STORE] if no_store else [header, NOSNIFF]
                rate = scope.get("state", {}).get("rate_limit")  # set by deps.current_principal
                if rate is not None and status != 429:  # a 429 carries its own
                    headers += [(k.lower().encode(), v.encode()) for k, v in rate.headers().items()]
                message["headers"] = headers
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # An unhandled error: Starlette's outermost ServerErrorMiddleware answers it outside this middleware,
            # without these headers. Answer the same 500 here (it then only logs the error and re-raises it).
            if not started:
                await self._internal_error(send_with_id)
            raise
        finally:
            method, route = metric_labels(scope)
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
            REQUESTS.labels(method, route, str(status)).inc()
            log.info(
                "%s %s %s",
                scope.get("method"),
                scope.get("path"),
                status,
                extra={"fields": {"request_id": request_id, "status": status, "route": route}},
            )

    @staticmethod
    async def _internal_error(send: Send) -> None:
        """The 500 the app's catch-all handler would answer, sent from here so that it carries the headers."""
        with contextlib.suppress(Exception):  # the client may be gone; the original error is what matters
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(INTERNAL_ERROR_BODY)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": INTERNAL_ERROR_BODY})


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body crossed the limit."""


class BodySizeLimit:
    """ASGI middleware: counts body bytes as they arrive and answers 413 as soon as ``max_bytes`` is crossed.

    The route that was reading the body sees an exception and stores nothing; whatever answer it tries
    to send is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(send)  # declared too large: refused before reading anything
                return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._too_large(send)
                return  # the route's own answer to the aborted body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(error_body("payload_too_large", f"request body over {self.max_bytes:,} bytes")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

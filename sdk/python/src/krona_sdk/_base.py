"""What the synchronous and the asynchronous client share: settings, one request's description, the retry
policy and how answers become models."""

from __future__ import annotations

import logging
import os
import platform
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel

from ._version import __version__
from .errors import APIConnectionError, APITimeoutError, AuthenticationError, KronaError, error_from_response

__all__ = ["DEFAULT_URL", "Backoff", "BaseClient", "Call"]

log = logging.getLogger("krona_sdk")

DEFAULT_URL = "http://127.0.0.1:8000"
# Answers that say "nothing was done, try again later": retried for every request.
RETRY_ALWAYS = frozenset({429, 503})
# Retry-After beyond this is not waited for inside one call: the error reaches the caller, who may wait.
MAX_RETRY_AFTER_SECONDS = 60.0
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0


@dataclass
class Call:
    """One API request: what to send, whether it is safe to send again, and what the answer is.

    ``idempotent``: sending it twice has the effect of sending it once (reads, deletes, cancels, and creates that
    carry an ``Idempotency-Key``). Such a call is retried after any failure that may be passing; any other call
    only when the server certainly did nothing (no connection made, 429, 503).
    """

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, Any] | None = None
    files: list[Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = True
    model: Any = None  # a pydantic model class for the JSON answer; None: the JSON itself
    raw: bool = False  # the answer's bytes
    timeout: Any = None


class Backoff:
    """Delays for polling: ``start`` seconds, times ``factor`` after each call, at most ``cap``."""

    def __init__(self, start: float = 0.5, factor: float = 1.5, cap: float = 5.0) -> None:
        self.delay, self.factor, self.cap = start, factor, cap
        self.start = start

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.cap, self.delay * self.factor)
        return delay

    def reset(self) -> None:
        self.delay = self.start


class BaseClient:
    """Settings: ``base_url`` (default $KRONA_URL or http://127.0.0.1:8000), ``api_key`` (default $KRONA_API_KEY),
    ``timeout`` (seconds per request), ``max_retries`` (after the first try)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("KRONA_URL") or DEFAULT_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        self.api_key = api_key if api_key is not None else (os.environ.get("KRONA_API_KEY") or None)
        self.timeout = timeout
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.max_retries = max_retries
        self.user_agent = f"krona-sdk/{__version__} python/{platform.python_version()}"
        self._headers = {"User-Agent": self.user_agent, **(headers or {})}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    def _request_kwargs(self, call: Call) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": call.headers}
        if call.params:
            kwargs["params"] = {k: v for k, v in call.params.items() if v is not None}
        if call.json is not None:
            kwargs["json"] = call.json
        if call.data is not None:
            kwargs["data"] = {k: v for k, v in call.data.items() if v is not None}
        if call.files is not None:
            kwargs["files"] = call.files
        if call.timeout is not None:
            kwargs["timeout"] = call.timeout
        return kwargs

    def _retry_delay(
        self, call: Call, attempt: int, response: httpx.Response | None = None, exc: Exception | None = None
    ) -> float | None:
        """Seconds to wait before trying ``call`` again after try number ``attempt`` (0-based), or None to stop."""
        if attempt >= self.max_retries:
            return None
        if exc is not None:
            # A connection that was never made sent nothing; anything later may have reached the server.
            nothing_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            return self._backoff(attempt) if nothing_sent or call.idempotent else None
        assert response is not None
        status = response.status_code
        if status in RETRY_ALWAYS or (status >= 500 and call.idempotent):
            from .errors import parse_retry_after

            after = parse_retry_after(response.headers.get("retry-after"))
            if after is None:
                return self._backoff(attempt)
            return after if after <= MAX_RETRY_AFTER_SECONDS else None
        return None

    @staticmethod
    def _backoff(attempt: int) -> float:
        """Exponential with jitter: 0.5 s, 1 s, 2 s, … at most 8 s, each scaled by a random factor in [0.5, 1]."""
        return min(MAX_BACKOFF_SECONDS, INITIAL_BACKOFF_SECONDS * 2**attempt) * (0.5 + random.random() / 2)

    def _log_retry(self, call: Call, delay: float, attempt: int, why: str) -> None:
        log.info(
            "%s %s: %s; retrying in %.1f s (retry %d of %d)",
            call.method,
            call.path,
            why,
            delay,
            attempt + 1,
            self.max_retries,
        )

    def _transport_error(self, exc: Exception) -> KronaError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            error = APITimeoutError(f"no answer from {self.base_url} in time ({exc.__class__.__name__})")
        else:
            error = APIConnectionError(
                f"cannot reach {self.base_url}: is `krona up` running? set base_url or KRONA_URL"
            )
        error.url = self.base_url
        return error

    def _error(self, response: httpx.Response) -> KronaError:
        error = error_from_response(response)
        if isinstance(error, AuthenticationError) and not self.api_key:
            error.message += " (no API key: pass api_key or set KRONA_API_KEY)"
            error.args = (error.message,)
        return error

    @staticmethod
    def _parse(call: Call, response: httpx.Response) -> Any:
        if call.raw:
            return response.content
        if response.status_code == 204 or not response.content:
            return None
        body = response.json()
        model = call.model
        if model is None:
            return body
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(body)
        return model(body)

"""What the app holds for its lifetime: settings, database, storage, the enqueuer, the base model's shapes."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import Invalid, Unavailable
from shared.krona.config import DEFAULT_TARGET_MODULES
from shared.models import BaseModelNotFound, unet_config
from shared.models.shapes import attention_projection_shapes, select_targets
from shared.queue import make_celery, send
from shared.settings import Settings
from shared.storage import Storage
from shared.tenants import key_is_active

from .events import ProgressHub

log = logging.getLogger("krona.gateway")


# How long a base model that could not be read is answered 503 without trying again.
BASE_MODEL_RETRY_SECONDS = 30


class Enqueuer(Protocol):
    def send(self, task: str, job_id: str) -> None: ...

    def send_many(self, task: str, job_ids: list[str]) -> int:
        """Send one message per job; how many were sent before the broker failed (an exception if none)."""
        ...

    def check(self) -> None: ...


class CeleryEnqueuer:
    """Sends tasks by name to the broker; never imports the worker code."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings)

    def send(self, task: str, job_id: str) -> None:
        send(self.app, task, job_id)

    def send_many(self, task: str, job_ids: list[str]) -> int:
        sent = 0
        with self.app.producer_or_acquire() as producer:  # one producer (and connection) for the whole batch
            for job_id in job_ids:
                try:
                    send(self.app, task, job_id, producer=producer)
                except Exception:
                    if sent == 0:
                        raise
                    break
                sent += 1
        return sent

    def check(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    enqueuer: Enqueuer
    progress: ProgressHub | None = None
    _shapes: dict[str, tuple[int, int]] | None = field(default=None)
    _native_size: int | None = field(default=None)
    # A base model that could not be read: (when, why), answered from here for BASE_MODEL_RETRY_SECONDS.
    _base_model_failure: tuple[float, str] | None = field(default=None)
    _base_model_lock: threading.Lock = field(default_factory=threading.Lock)
    _autocommit: Engine | None = field(default=None)
    _key_checks: dict[str, tuple[float, bool]] = field(default_factory=dict)

    def autocommit_session(self) -> Session:
        """A session whose every statement commits on its own: no BEGIN/COMMIT round trips, and a row lock taken
        by an UPDATE lasts only inside that statement (never while this process waits for the GIL). For the
        per-request key lookup and rate-limit bucket (deps.authenticate)."""
        if self._autocommit is None:
            self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        return self.sessions(bind=self._autocommit)

    def base_model_shapes(self) -> dict[str, tuple[int, int]]:
        """Attention projections of the configured base model, read once from its unet/config.json."""
        if self._shapes is None:
            self._load_base_model_config()
        return self._shapes or {}

    def key_is_active(self, key_id: str) -> bool:
        """Whether the API key still authenticates (not revoked; its tenant not deleted), read at most every
        few seconds per key and process: open event streams ask this (routes/trainings.py)."""
        now = time.monotonic()
        cached = self._key_checks.get(key_id)
        if cached is not None and now - cached[0] < 2.0:
            return cached[1]
        with self.autocommit_session() as session:
            active = key_is_active(session, key_id)
        if len(self._key_checks) > 10_000:
            self._key_checks.clear()
        self._key_checks[key_id] = (now, active)
        return active

    def check_servable(self, a_shape: tuple[int, int], layers) -> None:
        """422 ``unservable_adapter`` unless the inference engine can serve an adapter with A ``a_shape`` on
        ``layers`` (module paths): its slots hold A (``KRONA_ENGINE_A1``, ``KRONA_ENGINE_A2``) on the attention
        projections, and an adapter on a subset of them is served with the others at zero. Checked before a
        training is queued or an upload stored, so that the service never makes or keeps an adapter it cannot
        generate with."""
        engine = self.settings.engine_a_shape
        served = set(select_targets(self.base_model_shapes(), DEFAULT_TARGET_MODULES))
        outside = sorted(set(layers) - served)
        if tuple(a_shape) != engine or outside:
            reason = (
                f"A {a_shape[0]}x{a_shape[1]}" if tuple(a_shape) != engine else f"layers outside them ({outside[0]})"
            )
            raise Invalid(
                "unservable_adapter",
                f"this deployment generates with adapters of A {engine[0]}x{engine[1]} on the attention projections "
                f"(to_q, to_k, to_v, to_out.0) of {self.settings.base_model}; an adapter with {reason} could not be "
                f"served: use a1={engine[0]}, a2={engine[1]} (GET /v1/capabilities)",
                {"servable_factors": [{"a1": engine[0], "a2": engine[1]}], "target_modules": DEFAULT_TARGET_MODULES},
            )

    def ping_database(self) -> None:
        """One round trip to the database (readiness); raises when it does not answer."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def native_size(self) -> int:
        if self._native_size is None:
            self._load_base_model_config()
        return self._native_size or 512

    def _load_base_model_config(self) -> None:
        # One request reads it; the others wait for that one. A model that could not be read (a Hub id with no
        # network can take the Hub client's timeouts, 20 s and more) is answered 503 at once for a while, so that
        # a gateway with a bad KRONA_BASE_MODEL does not hold every create for that long.
        with self._base_model_lock:
            if self._native_size is not None:
                return
            failure = self._base_model_failure
            if failure is not None and time.monotonic() - failure[0] < BASE_MODEL_RETRY_SECONDS:
                raise Unavailable("base_model_unavailable", failure[1], retry_after=BASE_MODEL_RETRY_SECONDS)
            # unet_config reads the config without building the model (resolve_base_model would build a tiny one).
            try:
                config: dict[str, Any] = unet_config(self.settings.base_model)
            except BaseModelNotFound as exc:  # the server's KRONA_BASE_MODEL names no model it can read
                self._base_model_failure = (time.monotonic(), str(exc))
                raise Unavailable("base_model_unavailable", str(exc), retry_after=BASE_MODEL_RETRY_SECONDS) from None
            self._shapes = attention_projection_shapes(config)
            # The VAE downsamples by 8 in every SD-family model.
            self._native_size = int(config.get("sample_size", 64)) * 8

"""Settings: one pydantic-settings class, read from KRONA_* environment variables, validated at start.

The defaults are the embedded mode (SQLite, a local blob folder, Celery over kombu's
SQLAlchemy transport on SQLite, the built-in tiny-sd model), all under ``KRONA_DATA_DIR``. Production
sets ``KRONA_DATABASE_URL`` (PostgreSQL), ``KRONA_BROKER_URL`` (Redis), ``KRONA_S3_ENDPOINT`` and the
``KRONA_S3_*`` credentials, and ``KRONA_BASE_MODEL``; nothing else in the code path changes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PLACEHOLDER_SECRET", "Settings", "get_settings"]

PLACEHOLDER_SECRET = "change-me"


class Settings(BaseSettings):
    """Every setting the gateway, the workers and the CLI read. Env var = ``KRONA_`` + upper-case name."""

    model_config = SettingsConfigDict(env_prefix="KRONA_", extra="ignore")

    env: Literal["dev", "prod"] = Field("dev", description="prod refuses placeholder secrets and embedded backends")
    data_dir: Path = Field(Path(".krona"), description="embedded mode: database, broker, blobs, api-key file")
    # URLs may carry a password: kept out of reprs.
    database_url: str | None = Field(
        None, repr=False, description="SQLAlchemy URL; default sqlite:///<data_dir>/krona.db"
    )
    broker_url: str | None = Field(
        None, repr=False, description="Celery broker; default sqla+sqlite:///<data_dir>/broker.db"
    )
    base_model: str = Field("tiny-sd", description="base model: tiny-sd, tiny-sdxl, a folder or a hub id")
    # Adapter evaluation (params.evaluate, POST /v1/adapters/{id}/evaluations; workers/evaluation.py). The
    # defaults are shared/eval/metrics.py's; tests set tiny-clip / tiny-dino (built from config, no download).
    eval_clip_model: str = Field(
        "openai/clip-vit-large-patch14", description="CLIP model for CLIP-I/CLIP-T: hub id, folder or tiny-clip"
    )
    eval_dino_model: str = Field("facebook/dino-vits16", description="DINO model: hub id, folder or tiny-dino")

    # Storage -----------------------------------------------------------------------------------------------------
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL; unset = local blob folder")
    s3_bucket: str = Field("krona", min_length=3, max_length=63)
    s3_access_key: str | None = Field(None, repr=False)
    s3_secret_key: SecretStr | None = Field(None, description="shown as ********** in logs and reprs")
    s3_region: str = "us-east-1"
    blob_dir: Path | None = Field(None, description="local storage folder; default <data_dir>/blobs")

    # The HTTP API and webhooks ----------------------------------------------------------------------------------
    public_url: str = Field("http://127.0.0.1:8000", description="base URL used in links the API returns")
    allow_private_webhooks: bool = Field(False, description="allow webhook targets on loopback/private networks")
    webhook_max_attempts: int = Field(5, ge=1, le=50, description="deliveries tried per event before giving up")
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120, description="total deadline of one delivery")
    webhook_retry_base_seconds: float = Field(
        2.0, gt=0, le=3600, description="backoff before retry n is base * 2^(n-1) seconds, at most 300"
    )
    webhook_max_response_bytes: int = Field(4096, ge=0, description="how much of a receiver's answer is read")
    webhook_concurrency: int = Field(8, ge=1, le=256, description="deliveries in flight per webhook worker")

    # Uploads and request sizes ------------------------------------------------------------------------------------
    max_images: int = Field(20, ge=1, le=200, description="photos per training")
    min_images: int = Field(2, ge=1, le=200, description="photos per training")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024, description="bytes per photo")
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="pixels per uploaded photo, checked from its header before decoding (training uses 512-1024 px)",
    )
    max_request_bytes: int = Field(200 * 1024 * 1024, ge=1024, le=4 * 1024**3, description="one request's body")
    max_train_steps: int = Field(5000, ge=1, le=100_000, description="steps a training may ask for")
    default_train_steps: int | None = Field(None, ge=1, le=100_000, description="unset: the paper's per model family")
    checkpoint_every: int = Field(50, ge=0, le=100_000, description="a training's checkpoint interval (0: at the end)")
    max_batch_generations: int = Field(1000, ge=1, le=100_000, description="generations per POST /v1/batches")
    max_generation_compute: int = Field(
        1024 * 1024 * 50 * 4,
        ge=1,
        description="cap on width x height x steps x num_images of one generation (422 over it)",
    )

    # Tenancy: the defaults for every tenant; `PATCH /v1/tenants/{id}` stores per-tenant overrides.
    rate_limit_per_second: float = Field(
        100.0, ge=0, description="requests per second per API key (token bucket refill); 0 = no limit"
    )
    rate_limit_burst: int = Field(200, ge=1, description="token bucket size: requests a key may send at once")
    max_queued_jobs: int = Field(
        2000,
        ge=0,
        description="queued trainings, generations and evaluations per tenant (429 queue_full over it); 0 = no cap",
    )
    max_running_jobs: int = Field(
        0, ge=0, description="jobs of one queue a tenant may have running at once across workers; 0 = no cap"
    )
    max_training_compute: int = Field(
        20_000_000,
        ge=1,
        description="cap on a training's cost in 64x64 denoising steps: its steps x samples per step x 1.5, its "
        "class images and evaluation images, each scaled by the resolution's area (422 over it)",
    )
    max_class_images: int = Field(
        200, ge=0, le=10_000, description="num_class_images a training may ask for (prior preservation)"
    )
    max_gradient_accumulation: int = Field(16, ge=1, le=1024, description="gradient_accumulation a training may use")
    max_train_resolution: int = Field(1024, ge=64, le=4096, description="resolution a training may ask for (pixels)")
    max_api_keys: int = Field(20, ge=1, le=10_000, description="active (unrevoked) API keys per tenant")
    max_adapters: int = Field(
        1000, ge=1, le=1_000_000, description="adapters per tenant, counting trainings queued or running"
    )
    keep_training_images: bool = Field(False, description="keep the subject photos after a training ends")
    generation_ttl_hours: float = Field(
        24.0 * 30, ge=0, description="generated images are deleted this long after they were made; 0 = never"
    )
    retention_interval_seconds: int = Field(
        3600, ge=10, description="how often the reaper expires images and sweeps orphaned blobs"
    )
    class_image_ttl_hours: float = Field(
        24.0 * 30,
        gt=0,
        le=24 * 3650,
        description="cached class images (prior preservation) are deleted this long after they were made",
    )
    sweep_grace_seconds: int = Field(
        3600, ge=0, description="the storage sweep leaves blobs younger than this (uploads in flight)"
    )
    metrics_max_tenants: int = Field(
        50, ge=0, description="tenants named in per-tenant metrics labels (per process); the rest are 'other'"
    )

    gateway_workers: int = Field(1, ge=1, le=64, description="processes of `krona gateway` (--workers overrides)")
    gateway_threads: int = Field(
        40, ge=4, le=1000, description="threadpool of one gateway process; its database pool is this + 4"
    )
    db_pool_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="wait for a pooled connection before answering 503 database_unavailable"
    )
    max_event_streams_per_tenant: int = Field(100, ge=1, description="open progress streams per tenant per gateway")
    event_poll_interval_seconds: float = Field(
        0.5, gt=0, le=60, description="how often a followed training's row is read (once per gateway process)"
    )

    transient_retry_seconds: float = Field(
        600.0, gt=0, description="a job retries storage/database faults this long before failing with *_unavailable"
    )
    # Workers, leases, the reaper ---------------------------------------------------------------------------------
    lease_seconds: int = Field(
        120, ge=8, le=86_400, description="a job's lease; a worker renews it every lease_seconds / 4"
    )
    reaper_interval_seconds: int = Field(30, ge=1, le=3600, description="how often a worker's reaper runs")
    enqueue_grace_seconds: int = Field(
        60, ge=1, le=86_400, description="queued this long with no worker: enqueue again"
    )
    visibility_timeout_seconds: int = Field(
        6 * 3600, ge=60, le=7 * 86_400, description="Redis broker; longer than the longest job"
    )
    worker_device: str | None = Field(None, description="cpu or cuda; default cuda when available")

    # The inference engine ------------------------------------------------------------------------------------------
    engine_slots: int = Field(
        8, ge=1, le=1024, description="adapters resident on the device at once (the device cache tier)"
    )
    engine_host_cache_mb: int = Field(512, ge=0, le=1_048_576, description="host-memory tier of the adapter cache, MiB")
    engine_max_batch: int = Field(
        8,
        ge=1,
        le=256,
        description="images in flight on a worker, in all its denoising loops (one per size); joined between steps",
    )
    # The A shape (a1 x a2) of the engine's adapter slots: the one adapter shape this deployment serves; the gateway
    # refuses trainings and uploads of another shape (422 unservable_adapter).
    engine_a1: int = Field(
        64, ge=1, le=4096, description="A's rows in the engine's adapter slots (adapters must match)"
    )
    engine_a2: int = Field(8, ge=1, le=4096, description="A's columns in the engine's adapter slots")
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve the worker's Prometheus metrics on this port"
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token GET /metrics requires; unset = open in dev, disabled (404) in prod"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.env == "prod":
            problems = self._production_problems()
            if problems:
                raise ValueError("KRONA_ENV=prod refuses this configuration: " + "; ".join(problems))
        if self.s3_endpoint and not (self.s3_access_key and _secret(self.s3_secret_key)):
            raise ValueError("KRONA_S3_ENDPOINT needs KRONA_S3_ACCESS_KEY and KRONA_S3_SECRET_KEY")
        if not 1 <= self.min_images <= self.max_images:
            raise ValueError("need 1 <= KRONA_MIN_IMAGES <= KRONA_MAX_IMAGES")
        if self.lease_seconds < 8:
            raise ValueError("KRONA_LEASE_SECONDS must be at least 8")
        return self

    def _production_problems(self) -> list[str]:
        """Production refuses dev's embedded backends and placeholder secrets; every problem is listed."""
        problems = []
        database = (self.database_url or "").split(":", 1)[0].lower()
        if not self.database_url or database.split("+")[0] == "sqlite":
            problems.append("set KRONA_DATABASE_URL to a database server (PostgreSQL); SQLite is for dev")
        broker = (self.broker_url or "").split(":", 1)[0].lower()
        embedded = broker in ("memory", "filesystem") or (
            broker.split("+")[0] in ("sqla", "sqlalchemy") and "sqlite" in broker
        )
        if not self.broker_url or embedded:
            problems.append(
                "set KRONA_BROKER_URL to a broker server (Redis); embedded brokers (SQLite, filesystem, memory) "
                "are for dev"
            )
        for variable, url in (("KRONA_DATABASE_URL", self.database_url), ("KRONA_BROKER_URL", self.broker_url)):
            problems.extend(_placeholder_password(variable, url))
        if not self.s3_endpoint:
            problems.append("set KRONA_S3_ENDPOINT (S3-compatible storage); the local blob folder is for dev")
        elif _secret(self.s3_secret_key) in (None, "", PLACEHOLDER_SECRET):
            problems.append("set KRONA_S3_SECRET_KEY to the real secret")
        elif self.s3_access_key == PLACEHOLDER_SECRET:
            problems.append("set KRONA_S3_ACCESS_KEY to the real access key")
        if self.allow_private_webhooks:
            problems.append("unset KRONA_ALLOW_PRIVATE_WEBHOOKS: webhooks to private networks are for dev")
        metrics_token = _secret(self.metrics_token)
        if metrics_token is not None and metrics_token.strip() in ("", PLACEHOLDER_SECRET):
            problems.append("set KRONA_METRICS_TOKEN to a real secret, or unset it to disable /metrics")
        return problems

    @property
    def engine_a_shape(self) -> tuple[int, int]:
        """(engine_a1, engine_a2): the adapter shape the engine serves."""
        return self.engine_a1, self.engine_a2

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'krona.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.data_dir / "blobs").resolve()


def _placeholder_password(variable: str, url: str | None) -> list[str]:
    """The problem with ``url``'s password, if it is empty or the placeholder (or the URL does not parse)."""
    try:
        password = urlsplit(url or "").password
    except ValueError:
        return [f"{variable} is not a valid URL"]
    if password is not None and unquote(password) in ("", PLACEHOLDER_SECRET):
        return [f"{variable} has a placeholder password; set the real one"]
    return []


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()

"""The API's resources as pydantic models.

Every model takes fields it does not know (``extra="allow"``): a newer server that adds a field never breaks an
older client, and the new field is still readable as an attribute (``training.some_new_field``) and in
``model_dump()``. Fields an older server may lack have defaults.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PHASES",
    "TERMINAL_STATUSES",
    "Adapter",
    "AdapterConfig",
    "AdapterEvaluation",
    "ApiKey",
    "Batch",
    "Capabilities",
    "ErrorInfo",
    "Generation",
    "GenerationImage",
    "KronaModel",
    "Page",
    "Tenant",
    "TenantCreated",
    "Training",
    "TrainingEvent",
    "TrainingProgress",
    "Usage",
    "UsagePeriod",
    "WebhookSecret",
]

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Not terminal: ``canceling`` is a running job whose cancel was asked for, until its worker stops it.
# What a job is doing, in order (``progress.phase`` on servers that report it; derived from status and step
# otherwise).
PHASES = ("queued", "loading_model", "class_images", "training", "evaluating", "uploading")


class KronaModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class ErrorInfo(KronaModel):
    code: str
    message: str = ""


class TrainingProgress(KronaModel):
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = Field(None, description="seconds left in the training phase")
    phase: str | None = Field(None, description="one of PHASES while the job runs (servers that report it)")


class Training(KronaModel):
    id: str
    status: str
    name: str | None = None
    base_model: str | None = None
    instance_prompt: str | None = None
    progress: TrainingProgress = Field(default_factory=TrainingProgress)
    adapter_id: str | None = None
    error: ErrorInfo | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    num_images: int | None = None
    queue_position: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    images_deleted_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the training has ended (succeeded, failed or canceled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def position(self) -> int | None:
        """While queued: the place among this tenant's queued trainings (1 = next), when the server reports it."""
        return self.queue_position

    @property
    def phase(self) -> str:
        """What the training is doing: the server's ``progress.phase`` or, on servers without it, derived from
        status and step (queued; loading_model until the first step; training; then evaluating when
        ``params.evaluate`` asked for it, else uploading). A terminal training's phase is its status."""
        if self.done or self.status == "canceling":
            return self.status
        if self.progress.phase:
            return self.progress.phase
        if self.status == "queued":
            return "queued"
        step, total = self.progress.step, self.progress.total_steps
        if step <= 0:
            return "loading_model"
        if total and step >= total:
            return "evaluating" if self.params.get("evaluate") else "uploading"
        return "training"


class TrainingEvent(KronaModel):
    """One server-sent event of ``GET /v1/trainings/{id}/events``: ``event`` is ``progress`` or ``done``."""

    event: str
    training: Training


class AdapterConfig(KronaModel):
    a1: int | None = None
    a2: int | None = None
    targets: list[str] = Field(default_factory=list)


class AdapterEvaluation(KronaModel):
    status: str
    clip_i: float | None = None
    clip_t: float | None = None
    dino: float | None = None
    error: ErrorInfo | None = None


class Adapter(KronaModel):
    id: str
    name: str | None = None
    base_model: str | None = None
    config: AdapterConfig = Field(default_factory=AdapterConfig)
    num_parameters: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    training_id: str | None = None
    created_at: datetime | None = None
    evaluation: AdapterEvaluation | None = None


class GenerationImage(KronaModel):
    index: int
    url: str | None = None
    seed: int | None = None


class Generation(KronaModel):
    id: str
    status: str
    prompt: str | None = None
    adapter_id: str | None = None
    adapter_scale: float | None = None
    num_images: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    batch_id: str | None = None
    images: list[GenerationImage] = Field(default_factory=list)
    error: ErrorInfo | None = None
    queue_position: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    images_expired_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def position(self) -> int | None:
        """While queued: the place among this tenant's queued generations (1 = next), when the server reports it."""
        return self.queue_position

    @property
    def phase(self) -> str:
        """What the generation is doing: the server's ``phase`` (queued, loading_model, generating, uploading) or,
        on servers without it, queued / running; a terminal generation's phase is its status."""
        if self.done or self.status == "canceling":
            return self.status
        sent = (self.__pydantic_extra__ or {}).get("phase")
        if isinstance(sent, str) and sent:
            return sent
        return "queued" if self.status == "queued" else "running"


class Batch(KronaModel):
    id: str
    total: int = 0
    counts: dict[str, int] = Field(default_factory=dict)
    generation_ids: list[str] = Field(default_factory=list)
    created_at: datetime | None = None

    @property
    def finished(self) -> int:
        """Generations of the batch that have ended (succeeded, failed or canceled)."""
        return sum(self.counts.get(status, 0) for status in TERMINAL_STATUSES)

    @property
    def done(self) -> bool:
        """True once every generation of the batch has ended (none queued, running or canceling)."""
        return not any(n for status, n in self.counts.items() if status not in TERMINAL_STATUSES)

    @property
    def status(self) -> str:
        """The server's ``status`` if it sends one; else derived from the counts: queued, running, or (when done)
        failed if any failed, canceled if all were canceled, succeeded otherwise."""
        sent = (self.__pydantic_extra__ or {}).get("status")
        if isinstance(sent, str):
            return sent
        if not self.done:
            started = self.finished or any(self.counts.get(s, 0) for s in ("running", "canceling"))
            return "running" if started else "queued"
        if self.counts.get("failed", 0):
            return "failed"
        if self.counts.get("succeeded", 0) == 0 and self.counts.get("canceled", 0):
            return "canceled"
        return "succeeded"


class ApiKey(KronaModel):
    id: str
    name: str | None = None
    prefix: str | None = None
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    key: str | None = Field(None, description="the key itself: only in the answer to its creation")


class UsagePeriod(KronaModel):
    period: str
    kind: str
    jobs: int = 0
    worker_seconds: float = 0.0
    images: int = 0
    steps: int = 0
    pixels: int = 0
    devices: dict[str, float] = Field(default_factory=dict)


class Usage(KronaModel):
    start: str | None = None
    end: str | None = None
    granularity: str | None = None
    data: list[UsagePeriod] = Field(default_factory=list)


class Tenant(KronaModel):
    id: str
    name: str
    weight: float = 1.0
    limits: dict[str, Any] = Field(default_factory=dict)
    effective_limits: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None


class TenantCreated(KronaModel):
    tenant: Tenant
    api_key: str
    webhook_secret: str


class WebhookSecret(KronaModel):
    webhook_secret: str
    signature_header: str | None = None


class Capabilities(KronaModel):
    """``GET /v1/capabilities``: the server's base model, the factor shapes it serves, what trainings and
    generations accept and default to, and the caller's limits. Every field is optional: read what your server
    sends (``model_dump()`` shows all of it)."""

    base_model: str | None = None
    native_resolution: int | None = None
    servable_factors: list[dict[str, int]] = Field(default_factory=list)
    target_modules: list[str] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)
    generation: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)


class Page(KronaModel, Generic[T]):
    """One page of a list: ``data`` and the cursor of the next page (None on the last)."""

    data: list[T] = Field(default_factory=list)
    next_cursor: str | None = None

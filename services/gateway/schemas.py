"""Request and response bodies (pydantic), kept apart from the database models."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]


class ErrorInfo(BaseModel):
    code: str
    message: str


class Progress(BaseModel):
    step: int = Field(description="optimizer steps done")
    total_steps: int
    loss: float | None = None
    eta_seconds: float | None = None


class TrainingPublic(BaseModel):
    id: str = Field(examples=["trn_3f2a9c0d1e2b4a5f6c7d8e9f"])
    name: str | None = None
    status: Status
    base_model: str
    instance_prompt: str
    progress: Progress
    adapter_id: str | None = None
    error: ErrorInfo | None = None
    params: dict[str, Any]
    num_images: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class AdapterConfig(BaseModel):
    a1: int
    a2: int
    targets: list[str]


class AdapterPublic(BaseModel):
    id: str = Field(examples=["adp_0a1b2c3d4e5f60718293a4b5"])
    name: str | None = None
    base_model: str
    config: AdapterConfig
    num_parameters: int
    size_bytes: int
    sha256: str
    training_id: str | None = None
    created_at: datetime


class GenerationCreate(BaseModel):
    """One image request. Width/height default to the base model's native size."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a photo of sks dog on the moon",
                    "adapter_id": "adp_0a1b2c3d4e5f60718293a4b5",
                    "num_images": 2,
                    "seed": 7,
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=2000)
    adapter_id: str | None = None
    adapter_scale: float = Field(1.0, ge=0.0, le=2.0)
    negative_prompt: str | None = Field(None, max_length=2000)
    num_images: int = Field(1, ge=1, le=8)
    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    webhook_url: str | None = Field(None, max_length=2000)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class ImagePublic(BaseModel):
    index: int
    url: str
    seed: int


class GenerationPublic(BaseModel):
    id: str = Field(examples=["gen_5e6f708192a3b4c5d6e7f809"])
    status: Status
    prompt: str
    adapter_id: str | None = None
    adapter_scale: float
    num_images: int
    steps: int
    width: int
    height: int
    seed: int
    batch_id: str | None = None
    images: list[ImagePublic]
    error: ErrorInfo | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generations: list[GenerationCreate] = Field(min_length=1, max_length=1000)


class BatchPublic(BaseModel):
    id: str = Field(examples=["bat_11223344556677889900aabb"])
    total: int
    counts: dict[str, int]
    generation_ids: list[str]
    created_at: datetime


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None

"""/v1/capabilities: what this deployment does, for clients to read instead of hard-coding it."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from shared.schemas import EffectiveLimits

from ..deps import AuthenticatedRoute, ContextDep, CurrentPrincipal
from ..openapi import errors
from ..services.capabilities import capabilities

router = APIRouter(
    route_class=AuthenticatedRoute,
    prefix="/v1/capabilities",
    tags=["capabilities"],
    responses=errors(401, 422, 503),
)


class FactorShape(BaseModel):
    a1: int
    a2: int


class ImageLimitsPublic(BaseModel):
    min_images: int
    max_images: int
    max_bytes: int = Field(description="per photo")
    max_pixels: int = Field(description="per photo, read from its header before decoding")
    formats: list[str]


class TrainingCapabilities(BaseModel):
    params: list[str] = Field(description="what `params` may set")
    defaults: dict[str, object] = Field(description="what an absent param is (steps: the server's default)")
    max_steps: int
    images: ImageLimitsPublic


class GenerationCapabilities(BaseModel):
    defaults: dict[str, object]
    max_num_images: int
    max_steps: int
    max_batch_generations: int


class Capabilities(BaseModel):
    base_model: str
    native_resolution: int = Field(description="the base model's image size, the default width, height, resolution")
    servable_factors: list[FactorShape] = Field(
        description="the adapter shapes (A is a1 x a2) this deployment generates with: trainings and uploads of "
        "any other shape are refused with 422 unservable_adapter"
    )
    target_modules: list[str] = Field(description="the layers an adapter may adapt (a subset is served too)")
    training: TrainingCapabilities
    generation: GenerationCapabilities
    limits: EffectiveLimits = Field(description="the limits that apply to the caller's tenant (admin: the defaults)")
    webhook_events: list[str] = Field(description="the event types a webhook_events filter may name")


@router.get("", response_model=Capabilities, summary="What this deployment serves, its limits and defaults")
def get_capabilities(context: ContextDep, principal: CurrentPrincipal):
    """The base model, the adapter shapes it serves, what trainings and generations accept and default to, and the
    limits of the caller's tenant."""
    return capabilities(context=context, tenant=principal.tenant)

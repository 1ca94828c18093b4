"""What GET /v1/capabilities says: the base model, the adapter shapes served, defaults and the tenant's limits."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from shared.krona.config import DEFAULT_TARGET_MODULES
from shared.limits import tenant_limits
from shared.schemas import GenerationCreate
from shared.training_spec import TrainingSpec
from shared.webhooks import WEBHOOK_EVENTS

from ..context import AppContext
from .trainings import CLIENT_PARAMS

__all__ = ["capabilities"]


def _upper_bound(field: str) -> int:
    """The `le` bound the request schema states for a GenerationCreate field (one source for both)."""
    return next(m.le for m in GenerationCreate.model_fields[field].metadata if getattr(m, "le", None) is not None)


def capabilities(*, context: AppContext, tenant) -> dict[str, Any]:
    settings = context.settings
    spec = TrainingSpec(instance_prompt="x")
    size = context.native_size()
    a1, a2 = settings.engine_a_shape
    generation = GenerationCreate(prompt="x")
    return dict(
        base_model=settings.base_model,
        native_resolution=size,
        servable_factors=[{"a1": a1, "a2": a2}],
        target_modules=list(DEFAULT_TARGET_MODULES),
        training=dict(
            params=sorted(CLIENT_PARAMS),
            defaults={
                "steps": settings.default_train_steps or spec.resolved_steps(size >= 1024),
                "learning_rate": spec.learning_rate,
                "a1": a1,
                "a2": a2,
                "target_modules": list(spec.target_modules),
                "resolution": size,
                "gradient_accumulation": spec.gradient_accumulation,
                "seed": spec.seed,
                "random_flip": spec.random_flip,
                "prior_preservation": spec.prior_preservation,
                "num_class_images": spec.num_class_images,
                "evaluate": False,
            },
            max_steps=settings.max_train_steps,
            images=dict(
                min_images=settings.min_images,
                max_images=settings.max_images,
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                formats=["image/png", "image/jpeg", "image/webp"],
            ),
        ),
        generation=dict(
            defaults={
                "steps": generation.steps,
                "guidance_scale": generation.guidance_scale,
                "width": size,
                "height": size,
                "num_images": generation.num_images,
                "adapter_scale": generation.adapter_scale,
            },
            max_num_images=_upper_bound("num_images"),
            max_steps=_upper_bound("steps"),
            max_batch_generations=settings.max_batch_generations,
        ),
        limits=asdict(tenant_limits(settings, tenant.limits if tenant is not None else None)),
        webhook_events=list(WEBHOOK_EVENTS),
    )

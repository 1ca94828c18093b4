"""Prior preservation's class images, made by the base model itself before the adapter is injected."""

from __future__ import annotations

import torch

from shared.images import SubjectImage, to_uint8
from shared.training_spec import TrainingSpec

from .components import Components, native_resolution

__all__ = ["generate_class_images"]


@torch.no_grad()
def generate_class_images(components: Components, spec: TrainingSpec) -> list[SubjectImage]:
    """Prior-preservation images of the class, made by the base model itself (seeded, so resumable)."""
    resolution = spec.resolution or native_resolution(components)
    generator = torch.Generator().manual_seed(spec.seed + 2)
    images = []
    for index in range(spec.num_class_images):
        out = components.pipe(
            spec.class_prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=spec.validation_steps,
            generator=generator,
            output_type="np",
        ).images[0]
        images.append(SubjectImage(name=f"class-{index}", pixels=to_uint8(out)))
    return images

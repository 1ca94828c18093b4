"""Prior preservation's class images, made by the base model itself before the adapter is injected.

Each image has its own seed (``CLASS_IMAGE_SEED`` + its index), so that image i never depends on the images
before it: a cache can hold any prefix of the set, a training asking for more images than are cached makes only
the missing ones, and a training stopped half-way (SIGTERM) resumes with the images already made. The service's
cache lives in storage per tenant (workers/training/job.py: ``StorageClassImageCache``).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from shared.images import SubjectImage, to_uint8
from shared.training_spec import TrainingSpec

from .components import Components, native_resolution, render

__all__ = ["CLASS_IMAGE_SEED", "ClassImageCache", "class_image_set", "generate_class_images"]

CLASS_IMAGE_SEED = 1_000_003


class ClassImageCache(Protocol):
    """PNG bytes of the class images of one set (``class_image_set``), by index."""

    def get(self, index: int) -> bytes | None: ...

    def put(self, index: int, png: bytes) -> None: ...


def class_image_set(base_model: str, spec: TrainingSpec, resolution: int) -> str:
    """The name of the set a training's class images belong to: trainings of the same base model, class prompt,
    resolution and denoising steps share it (the count is not part of it: image i is the same in every set)."""
    key = {"base_model": base_model, "class_prompt": spec.class_prompt, "resolution": resolution,
           "steps": spec.validation_steps, "seeding": CLASS_IMAGE_SEED}  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _png(pixels: np.ndarray) -> bytes:
    # lazy: loads PIL
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    # lazy: loads PIL
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


@torch.no_grad()
def generate_class_images(
    components: Components,
    spec: TrainingSpec,
    *,
    cache: ClassImageCache | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[SubjectImage]:
    """Prior-preservation images of the class: ``spec.num_class_images`` of them, from ``cache`` where it has
    them, else made by the base model (and put in the cache one by one). ``should_stop`` is asked before each
    image made; on True, TrainingCanceled is raised at step 0 (what was made is in the cache)."""
    from .trainer import TrainingCanceled  # here: trainer.py imports this module

    resolution = spec.resolution or native_resolution(components)
    images = []
    for index in range(spec.num_class_images):
        cached = cache.get(index) if cache is not None else None
        if cached is not None:
            images.append(SubjectImage(name=f"class-{index}", pixels=_pixels(cached)))
            continue
        if should_stop is not None and should_stop():
            raise TrainingCanceled(0, None)
        generator = torch.Generator().manual_seed(CLASS_IMAGE_SEED + index)
        out = render(components, spec.class_prompt, resolution, spec.validation_steps, generator)
        pixels = to_uint8(out)
        if cache is not None:
            cache.put(index, _png(pixels))
        images.append(SubjectImage(name=f"class-{index}", pixels=pixels))
    return images

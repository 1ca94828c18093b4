"""Validation images: what the adapter renders for the validation prompt, during and after training."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shared.images import save_image
from shared.training_spec import TrainingSpec

from .components import Components, native_resolution, render

__all__ = ["render_validation_images"]


@torch.no_grad()
def render_validation_images(
    components: Components, spec: TrainingSpec, directory: str | os.PathLike, step: int
) -> list[Path]:
    """Images of ``validation_prompt`` (or the instance prompt) with the adapter as it is now."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pipe = components.pipe
    was_training = pipe.unet.training
    pipe.unet.eval()
    moved = []
    if components.device.type != "cpu":  # encoders were parked on the CPU after caching
        for name in ("text_encoder", "text_encoder_2", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and next(module.parameters()).device != components.device:
                module.to(components.device)
                moved.append(module)
    resolution = spec.resolution or native_resolution(components)
    generator = torch.Generator().manual_seed(spec.seed)
    paths = []
    for index in range(spec.num_validation_images):
        image = render(
            components, spec.validation_prompt or spec.instance_prompt, resolution, spec.validation_steps, generator
        )
        path = out / f"step-{step:07d}-{index}.png"
        save_image(image, path)
        paths.append(path)
    for module in moved:
        module.to("cpu")
    pipe.unet.train(was_training)
    return paths

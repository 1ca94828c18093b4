"""Held-out denoising loss of an adapter: how well the adapted UNet denoises images it was not trained on.

On held-out photos of the subject (with the instance prompt) a lower loss than the base model's means the
adapter learned the subject rather than its training photos; on class images (with the class prompt) a loss
that rises above the base model's is language drift, what prior preservation guards against. The base and
the adapted model see the same (image, noise, timestep) draws, so the difference is the adapter's alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from shared.eval.run import is_diffusers_lora
from shared.images import SubjectImage
from shared.krona import load_into_pipeline, set_adapter_scale
from shared.training_spec import TrainingSpec

from .components import load_components
from .data import prepare_data
from .step import denoising_loss

__all__ = ["heldout_losses"]


def heldout_losses(
    base_model: str,
    adapter: str | os.PathLike | None,
    sets: Mapping[str, tuple[Sequence[SubjectImage], str]],
    *,
    adapter_scale: float = 1.0,
    resolution: int | None = None,
    seed: int = 0,
    samples: int = 16,
    device: str | None = None,
) -> dict[str, dict[str, float | int | str]]:
    """For each named set of (images, prompt): `{"prompt", "images", "base", "adapter"}` mean denoising losses.

    `samples` draws of (image, latent, noise, timestep) per set, from `seed`; without an adapter, only `base`.
    """

    if not 1 <= samples <= 1024:
        raise ValueError(f"the held-out loss takes 1 to 1024 samples, got {samples}")
    components = load_components(base_model, device=device)
    lora = bool(adapter) and is_diffusers_lora(adapter)

    def set_scale(scale: float) -> None:
        if lora:
            components.pipe.set_adapters(["heldout"], adapter_weights=[scale])
        else:
            set_adapter_scale(components.unet, scale, "heldout")

    if lora:
        components.pipe.load_lora_weights(str(adapter), adapter_name="heldout")
    elif adapter:
        load_into_pipeline(components.pipe, adapter, scale=adapter_scale, name="heldout")
    results: dict[str, dict[str, float | int | str]] = {}
    for name, (images, prompt) in sets.items():
        spec = TrainingSpec(instance_prompt=prompt, resolution=resolution)
        data = prepare_data(components, images, spec)
        result: dict[str, float | int | str] = {"prompt": prompt, "images": len(images)}
        if adapter:
            set_scale(0.0)
        result["base"] = denoising_loss(components, data, seed=seed, samples=samples)
        if adapter:
            set_scale(adapter_scale)
            result["adapter"] = denoising_loss(components, data, seed=seed, samples=samples)
        results[name] = result
    return results

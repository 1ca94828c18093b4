"""Loading the frozen base model for training, and encoding prompts and images once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shared.models import is_sdxl, load_pipeline

__all__ = ["Components", "encode_prompt", "load_components", "native_resolution", "render", "weight_dtype_for"]


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """Dtype of the frozen weights: half precision when mixed precision is on (factors stay float32)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


@dataclass
class Components:
    """The pipeline (for encoding and validation), its UNet, and the noise schedule used for training."""

    pipe: Any
    noise_scheduler: Any
    sdxl: bool
    device: torch.device
    weight_dtype: torch.dtype
    base_model: str

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def vae(self) -> Any:
        return self.pipe.vae


def load_components(
    base_model: str, *, device: str | torch.device | None = None, mixed_precision: str = "no"
) -> Components:
    """Load ``base_model`` (built-in name, folder or hub id) frozen, on ``device`` (default: CUDA if present)."""
    # lazy: loads torch, diffusers, PIL, …
    from diffusers import DDPMScheduler

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weight_dtype = weight_dtype_for(mixed_precision)
    if device.type == "cpu" and weight_dtype == torch.float16:
        raise ValueError("fp16 mixed precision needs a GPU; use mixed_precision='bf16' or 'no' on the CPU")
    pipe = load_pipeline(base_model)
    pipe.set_progress_bar_config(disable=True)
    for module in _frozen_modules(pipe):
        module.requires_grad_(False)
        # The VAE stays float32: half-precision VAEs (SD 1.x, SDXL) overflow on encode.
        dtype = torch.float32 if module is pipe.vae else weight_dtype
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)
        module.to(device)
    # Training samples the forward (noising) process; DDPM's is the one every SD scheduler shares.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe, noise_scheduler, is_sdxl(pipe), device, weight_dtype, base_model)


def _frozen_modules(pipe: Any) -> list[torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]


def native_resolution(components: Components) -> int:
    """The image size the UNet was trained at (sample_size x VAE scale factor): 512 SD 1.5, 1024 SDXL."""
    return int(components.unet.config.sample_size) * int(components.pipe.vae_scale_factor)


@torch.no_grad()
def render(components: Components, prompt: str, resolution: int, steps: int, generator: torch.Generator) -> Any:
    """One image of ``prompt``, ``resolution`` px square, from the pipeline as it is now (with the adapter, if one
    is in it): float pixels in [0, 1], height x width x 3."""
    return components.pipe(
        prompt, height=resolution, width=resolution, num_inference_steps=steps, generator=generator, output_type="np"
    ).images[0]


def encode_prompt(components: Components, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds (1, 77, D), pooled (1, P) for SDXL else None), exactly as the pipeline encodes at inference."""
    pipe = components.pipe
    if components.sdxl:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, device=components.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(prompt, components.device, 1, False)
    return embeds, None

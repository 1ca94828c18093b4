"""The training data, encoded once (``prepare_data``): subject (and class) images, resized and center-cropped
(``to_training_tensor``), to VAE latent distributions; prompts to text embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.images import SubjectImage
from shared.training_spec import TrainingSpec

from .components import Components, encode_prompt, native_resolution

__all__ = ["PreparedData", "prepare_data", "to_training_tensor"]


@dataclass
class PreparedData:
    """Everything frozen, computed once: latent distributions and text conditioning.

    The VAE and text encoders are frozen, so encoding them every step (as the plain DreamBooth
    scripts do) would only repeat the same work; the latent *distribution* (mean, std) is cached and
    sampled each step, which keeps the VAE's sampling noise in training.
    """

    latent_mean: torch.Tensor  # (n, 4, h, w); flipped copies follow when random_flip is on
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor  # (1, 77, D)
    pooled: torch.Tensor | None  # (1, P) for SDXL
    time_ids: torch.Tensor | None  # (n, 6) for SDXL: original size, crop top-left, target size
    num_images: int
    flips: bool
    class_data: PreparedData | None = None


def to_training_tensor(image: SubjectImage, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution``, center-crop to a square, scale to [-1, 1].

    Returns (tensor (3, resolution, resolution), original size (h, w), crop top-left (top, left) in the
    resized image); SDXL conditions on the last two (``add_time_ids``).
    """
    # lazy: loads PIL
    from PIL import Image

    pil = Image.fromarray(image.pixels)
    w, h = pil.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    pil = pil.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (h, w), (top, left)


def prepare_data(
    components: Components,
    images: Sequence[SubjectImage],
    spec: TrainingSpec,
    *,
    class_images: Sequence[SubjectImage] | None = None,
) -> PreparedData:
    """Encode the subject images (and class images for prior preservation) and the prompts once."""
    if not images:
        raise ValueError("no subject images")
    # A worker reuses components across jobs; the encoders may have been parked on the CPU by the last one.
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(components.pipe, name, None)
        if module is not None:
            module.to(components.device)
    resolution = spec.resolution or native_resolution(components)
    data = _prepare_set(components, images, spec.instance_prompt, resolution, spec.random_flip)
    if spec.prior_preservation:
        if not class_images:
            raise ValueError("prior_preservation is on but no class images were given or generated")
        data.class_data = _prepare_set(components, class_images, spec.class_prompt or "", resolution, spec.random_flip)
    # The text encoders are no longer needed on the device while the UNet trains.
    if components.device.type != "cpu":
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(components.pipe, name, None)
            if module is not None:
                module.to("cpu")
        components.vae.to("cpu")
        torch.cuda.empty_cache()
    return data


def _prepare_set(
    components: Components, images: Sequence[SubjectImage], prompt: str, resolution: int, flips: bool
) -> PreparedData:
    tensors, sizes, crops = [], [], []
    for image in images:
        tensor, size, crop = to_training_tensor(image, resolution)
        tensors.append(tensor)
        sizes.append(size)
        crops.append(crop)
    pixels = torch.stack(tensors)
    if flips:
        pixels = torch.cat([pixels, torch.flip(pixels, dims=[3])])
        sizes, crops = sizes * 2, crops * 2
    mean, std = [], []
    for chunk in pixels.split(4):  # bounded VAE memory at 1024 px
        m, s = _encode_images(components, chunk)
        mean.append(m)
        std.append(s)
    embeds, pooled = encode_prompt(components, prompt)
    time_ids = None
    if components.sdxl:
        time_ids = torch.tensor(
            [[*size, *crop, resolution, resolution] for size, crop in zip(sizes, crops, strict=True)]
        )
        time_ids = time_ids.to(torch.float32)
    return PreparedData(
        latent_mean=torch.cat(mean),
        latent_std=torch.cat(std),
        prompt_embeds=embeds.cpu(),
        pooled=None if pooled is None else pooled.cpu(),
        time_ids=time_ids,
        num_images=len(images),
        flips=flips,
    )


@torch.no_grad()
def _encode_images(components: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vae = components.vae
    dist = vae.encode(pixels.to(components.device, torch.float32)).latent_dist
    return dist.mean.cpu(), dist.std.cpu()

"""Turning decoded subject images into training tensors: resize + center crop to the resolution."""

from __future__ import annotations

import numpy as np
import torch

from shared.images import SubjectImage

__all__ = ["to_training_tensor"]


def to_training_tensor(image: SubjectImage, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution``, center-crop to a square, scale to [-1, 1].

    Returns (tensor (3, resolution, resolution), original size (h, w), crop top-left (top, left) in the
    resized image); SDXL conditions on the last two (``add_time_ids``).
    """
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

"""Subject images: safe decoding with limits, then resize + center crop to the training resolution."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLimits",
    "SubjectImage",
    "decode_image",
    "list_image_files",
    "load_subject_images",
    "to_training_tensor",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be. Checked on the header before the pixels are decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # a 20000x20000 header "bomb" is refused before decoding
    min_side: int = 64
    max_count: int = 20
    min_count: int = 1
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class SubjectImage:
    """A decoded RGB image (H, W, 3) uint8 and the name it came from (for error messages)."""

    name: str
    pixels: np.ndarray


def decode_image(data: bytes, name: str, limits: ImageLimits = ImageLimits()) -> SubjectImage:
    """Decode one image: size and pixel limits first, EXIF orientation applied, converted to RGB.

    Raises ValueError naming the image for anything unreadable, truncated, too large or too small.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ValueError(f"{name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            width, height = probe.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from None
    if fmt not in limits.formats:
        raise ValueError(f"{name}: format {fmt} is not accepted; use {', '.join(limits.formats)}")
    if width * height > limits.max_pixels:
        raise ValueError(f"{name}: {width}x{height} is over the limit of {limits.max_pixels:,} pixels")
    if min(width, height) < limits.min_side:
        raise ValueError(f"{name}: {width}x{height} is too small; the shorter side must be at least {limits.min_side}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a truncated file fails here, not later in the middle of training
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name}: the image data is damaged ({exc})") from None
    return SubjectImage(name=name, pixels=np.asarray(rgb, dtype=np.uint8).copy())


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (by extension) directly inside ``folder``, sorted by name."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"image folder {path} does not exist or is not a folder")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_subject_images(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    limits: ImageLimits = ImageLimits(),
) -> list[SubjectImage]:
    """Decode the subject images from a folder or a list of files, all checked before any is used."""
    if isinstance(sources, str | os.PathLike):
        files = list_image_files(sources)
        where = f" in {sources}"
    else:
        files = [Path(p) for p in sources]
        where = ""
    if len(files) < limits.min_count:
        raise ValueError(f"no images{where}: give at least {limits.min_count} ({', '.join(IMAGE_EXTENSIONS)})")
    if len(files) > limits.max_count:
        raise ValueError(f"{len(files)} images{where}; at most {limits.max_count} are accepted")
    return [decode_image(Path(f).read_bytes(), Path(f).name, limits) for f in files]


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


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(tensors))

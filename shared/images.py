"""Decoding uploaded images safely (limits checked on the header first, EXIF orientation, RGB), and
encoding generated ones as PNG.

Torch-free (Pillow and numpy only), so the gateway validates uploads with the same rules the trainer
applies, before anything is stored.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDamaged",
    "ImageError",
    "ImageFormatRefused",
    "ImageLimits",
    "ImageTooLarge",
    "ImageTooSmall",
    "ImageUnreadable",
    "SubjectImage",
    "decode_image",
    "encode_png",
    "list_image_files",
    "load_subject_images",
    "save_image",
    "to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(ValueError):
    """An image that cannot be used; the subclass says why (the gateway maps each to a status and code)."""


class ImageUnreadable(ImageError):
    """Not an image Pillow can identify."""


class ImageFormatRefused(ImageError):
    """An image, but not one of the accepted formats."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit."""


class ImageTooSmall(ImageError):
    """The shorter side is under the minimum."""


class ImageDamaged(ImageError):
    """The header reads but the pixels do not (truncated or corrupt)."""


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
    """A decoded RGB image (H, W, 3) uint8, the name it came from (for error messages) and its file format."""

    name: str
    pixels: np.ndarray
    format: str = "PNG"


def decode_image(data: bytes, name: str, limits: ImageLimits = ImageLimits()) -> SubjectImage:
    """Decode one image: size and pixel limits first, EXIF orientation applied, converted to RGB.

    Raises an ImageError (a ValueError) naming the image: ImageUnreadable, ImageFormatRefused, ImageTooLarge,
    ImageTooSmall or ImageDamaged.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{name}: the image is over the limit of {limits.max_pixels:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError):  # PIL's messages carry object reprs: not shown
        raise ImageUnreadable(f"{name}: not a readable image (send PNG, JPEG or WebP)") from None
    if fmt not in limits.formats:
        raise ImageFormatRefused(f"{name}: format {fmt} is not accepted; use {', '.join(limits.formats)}")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} is over the limit of {limits.max_pixels:,} pixels")
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(
            f"{name}: {width}x{height} is too small; the shorter side must be at least {limits.min_side}"
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a truncated file fails here, not later in the middle of training
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # PIL's text may carry reprs
        raise ImageDamaged(f"{name}: the image data is damaged (truncated or corrupt)") from None
    return SubjectImage(name=name, pixels=np.asarray(rgb, dtype=np.uint8).copy(), format=fmt)


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


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (a pipeline's ``output_type="np"``, (H, W, 3)) as uint8: clipped, then rounded."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """A float image in [0, 1] (H, W, 3), as ``to_uint8`` converts it, encoded as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(image: np.ndarray, path: str | os.PathLike) -> None:
    """A float image in [0, 1] (H, W, 3), as ``to_uint8`` converts it, saved in the format of the path's
    extension (Pillow's rule: ``.png`` is PNG)."""
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)

"""Reading and checking uploaded photos (trainings and adapter evaluations share it)."""

from __future__ import annotations

import contextlib

from fastapi import UploadFile

from shared.errors import Invalid, TooLarge, Unavailable, UnsupportedMedia
from shared.images import (
    DecoderBusy,
    ImageError,
    ImageFormatRefused,
    ImageLimits,
    ImageTooLarge,
    ImageUnreadable,
    validate_image,
)
from shared.settings import Settings
from shared.storage import Storage

__all__ = ["decode_uploaded_images", "read_uploads", "store_photos"]

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def store_photos(storage: Storage, prefix: str, keys: list[str], images: list[tuple[bytes, str]]) -> None:
    """The decoded photos (bytes, extension) under ``keys``; on a storage error none of the job's stays (all under
    ``prefix`` deleted, as far as the storage lets) and the answer is 503 ``storage_unavailable``."""
    try:
        for key, (data, ext) in zip(keys, images, strict=True):
            storage.put_bytes(key, data, content_type=f"image/{'jpeg' if ext == 'jpg' else ext}")
    except Exception:
        with contextlib.suppress(Exception):  # storage is down: the cleanup may fail too; the 503 must not
            storage.delete_prefix(prefix)
        raise Unavailable("storage_unavailable", "could not store the images; try again") from None


async def read_uploads(settings: Settings, uploads: list[UploadFile]) -> list[tuple[str, bytes]]:
    """(label, bytes) of each uploaded file, read up to the image size limit (413 ``image_too_large`` over it)."""
    files: list[tuple[str, bytes]] = []
    for index, upload in enumerate(uploads):
        data = await upload.read(settings.max_image_bytes + 1)
        label = upload.filename or f"image {index}"
        if len(data) > settings.max_image_bytes:
            raise TooLarge("image_too_large", f"{label}: over {settings.max_image_bytes:,} bytes")
        files.append((label, data))
    return files


def decode_uploaded_images(settings: Settings, files: list[tuple[str, bytes]]) -> list[tuple[bytes, str]]:
    """(bytes, extension) of each uploaded photo, checked as the trainer will decode it (shared/images.py: the
    structure and size on the bytes before any pixel is decoded, then a decode in one of the process's decode
    slots, within a CPU budget): 415 for a format that is not PNG/JPEG/WebP or an animated one, 413 over the
    byte or pixel limit, 422 for one too small, damaged or too costly to decode (too many JPEG scans or PNG
    chunks, over the budget), 503 ``decoder_busy`` when no decode slot came free in time."""
    limits = ImageLimits(
        max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, max_count=settings.max_images
    )
    images: list[tuple[bytes, str]] = []
    for label, data in files:
        try:
            fmt = validate_image(data, label, limits)
        except (ImageUnreadable, ImageFormatRefused) as exc:
            raise UnsupportedMedia("unsupported_image", str(exc)) from None
        except ImageTooLarge as exc:
            raise TooLarge("invalid_image", str(exc)) from None
        except ImageError as exc:  # too small, damaged, too costly
            raise Invalid("invalid_image", str(exc)) from None
        except DecoderBusy as exc:
            raise Unavailable("decoder_busy", f"{exc} (the server is decoding other uploads)") from None
        images.append((data, _EXTENSIONS[fmt]))
    return images

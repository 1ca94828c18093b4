"""Images and files given to the API: folders, globs, paths, bytes or open files, read once into memory so that a
retried request sends the same bytes."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Union

__all__ = ["IMAGE_SUFFIXES", "FileInput", "ImagesInput", "collect_image_files", "read_file", "read_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FileInput = Union[str, os.PathLike, bytes, bytearray, IO[bytes]]  # noqa: UP007 (a runtime alias)
ImagesInput = Union[FileInput, Iterable[FileInput]]  # noqa: UP007
_GLOB_CHARS = ("*", "?", "[")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"RIFF", "image/webp", ".webp"),
)


def _media_type(data: bytes, name: str) -> tuple[str, str]:
    """(content type, suffix) from the first bytes, else from the name."""
    for magic, media, suffix in _MAGIC:
        if data.startswith(magic) and (media != "image/webp" or data[8:12] == b"WEBP"):
            return media, suffix
    suffix = Path(name).suffix.lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        suffix, "application/octet-stream"
    ), suffix


def collect_image_files(spec: str | os.PathLike) -> list[Path]:
    """The image files one argument names: a folder (its PNG/JPEG/WebP files, sorted), a glob pattern, or a file.

    Raises FileNotFoundError for a path that does not exist or a pattern that matches nothing, and ValueError
    for a folder without images.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no PNG/JPEG/WebP images in the folder {text}")
        return files
    if path.is_file():
        return [path]
    if any(char in text for char in _GLOB_CHARS):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no file matches {text}")
        return matches
    raise FileNotFoundError(f"no such file or folder: {text}")


def read_file(item: FileInput, default_name: str = "file") -> tuple[str, bytes]:
    """(file name, bytes) of a path, bytes or a file object opened in binary mode."""
    if isinstance(item, bytes | bytearray):
        return default_name, bytes(item)
    if isinstance(item, str | os.PathLike):
        path = Path(item).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"{item} is a folder, not a file")
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {item}")
        return path.name, path.read_bytes()
    if hasattr(item, "read"):
        data = item.read()
        if isinstance(data, str):
            raise TypeError("open the file in binary mode ('rb')")
        name = getattr(item, "name", None)
        return (Path(name).name if isinstance(name, str) else default_name), data
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(item).__name__}")


def read_images(images: ImagesInput) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``images`` parts from a folder, a glob, a path, bytes, a file object, or a list of those."""
    if isinstance(images, str | os.PathLike):
        items: list[Any] = list(collect_image_files(images))
    elif isinstance(images, bytes | bytearray) or hasattr(images, "read"):
        items = [images]
    else:
        items = []
        for item in images:
            items.extend(collect_image_files(item) if isinstance(item, str | os.PathLike) else [item])
    if not items:
        raise ValueError("no images given")
    parts = []
    for index, item in enumerate(items):
        name, data = read_file(item, f"image-{index}")
        media, suffix = _media_type(data, name)
        if not Path(name).suffix and suffix:
            name += suffix
        parts.append(("images", (name, data, media)))
    return parts

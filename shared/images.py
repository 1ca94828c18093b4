"""Decoding uploaded images safely, and encoding generated ones as PNG.

An upload is checked in three steps, each cheaper than the next and each bounding the next one's cost:

1. the byte stream, without Pillow: the format from its signature (PNG, JPEG, WebP), the size from its header
   (PNG IHDR, JPEG SOF, WebP VP8/VP8L/VP8X), and its structure: a JPEG's scans (each progressive scan is
   another pass over every block of the image: 500 copies of one 60-byte refinement scan cost 13 s at 36 MP),
   a PNG's chunks (no APNG), a WebP's chunks (no animation). Refused here: over the byte, pixel, scan or chunk
   limits, too small, not an accepted format. Nothing is allocated in proportion to the claimed size;
2. Pillow's header (``Image.open``, only the sniffed format's plugin): the same checks on what Pillow read;
3. the pixels, in one of a process-wide number of decode slots (``set_decode_concurrency``: by default as
   many as the process has CPUs, so the gateway's 40 threadpool threads cannot all decode at once; waiting
   longer than its ``wait_seconds`` for one raises ``DecoderBusy``), with a CPU budget: the decoder is fed in
   blocks and stopped once the thread has spent ``ImageLimits.max_decode_seconds`` of CPU time.

``validate_image`` (the gateway: it stores the original bytes and throws the pixels away) decodes a JPEG at
1/8 scale (``Image.draft``: the entropy decoding still reads every coefficient, so a damaged file is still
found); ``decode_image`` (the trainer, the evaluation) decodes at full size.

Torch-free (Pillow and numpy only), so the gateway validates uploads with the same rules the trainer applies,
before anything is stored.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.ImageFile import ImageFile

__all__ = [
    "DEFAULT_DECODE_WAIT_SECONDS",
    "IMAGE_EXTENSIONS",
    "DecoderBusy",
    "ImageDamaged",
    "ImageError",
    "ImageFormatRefused",
    "ImageLimits",
    "ImageTooComplex",
    "ImageTooLarge",
    "ImageTooSmall",
    "ImageUnreadable",
    "SubjectImage",
    "decode_concurrency",
    "decode_image",
    "encode_png",
    "list_image_files",
    "load_subject_images",
    "save_image",
    "set_decode_concurrency",
    "to_uint8",
    "validate_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(ValueError):
    """An image that cannot be used; the subclass says why (the gateway maps each to a status and code)."""


class ImageUnreadable(ImageError):
    """Not an image Pillow can identify."""


class ImageFormatRefused(ImageError):
    """An image, but not one of the accepted formats (or an animated one)."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit."""


class ImageTooSmall(ImageError):
    """The shorter side is under the minimum."""


class ImageDamaged(ImageError):
    """The header reads but the pixels do not (truncated or corrupt)."""


class ImageTooComplex(ImageError):
    """Within the byte and pixel limits, but built to be expensive: too many JPEG scans or PNG/WebP chunks, or a
    decode that spent its CPU budget."""


class DecoderBusy(RuntimeError):
    """No decode slot came free in time (``set_decode_concurrency``): the process is decoding at capacity.
    Not the image's fault: the gateway answers 503 with Retry-After."""


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may be, and what decoding it may cost. Everything but the CPU budget is checked on
    the byte stream before Pillow reads it.

    max_jpeg_scans: a baseline JPEG has 1 scan, libjpeg's progressive ones 10 (6 for grey), mozjpeg's up to ~20.
    max_segments: JPEG marker segments (APPn, DQT, DHT, SOS, ...), PNG chunks other than IDAT, WebP chunks;
        a photo has tens. Each costs Pillow a pass of its Python header parser.
    max_png_data_chunks: IDAT chunks (encoders write 8-64 KiB each: 2,560 for 20 MiB at 8 KiB).
    max_decode_seconds: CPU seconds (of the decoding thread) one image may take; an accepted image within the
        other limits takes well under two (16 MP: ~1.3 s for a lossy WebP of noise, ~0.4 s for a 32-scan JPEG).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000  # a 20000x20000 header "bomb" is refused before decoding
    min_side: int = 64
    max_count: int = 20
    min_count: int = 1
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_jpeg_scans: int = 32
    max_segments: int = 1024
    max_png_data_chunks: int = 16384
    max_decode_seconds: float = 5.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats) - set(_SIGNATURES))
        if unknown:
            raise ValueError(f"ImageLimits.formats: {', '.join(unknown)} cannot be checked; use PNG, JPEG, WEBP")


@dataclass(frozen=True)
class SubjectImage:
    """A decoded RGB image (H, W, 3) uint8, the name it came from (for error messages) and its file format."""

    name: str
    pixels: np.ndarray
    format: str = "PNG"


# Decode slots -------------------------------------------------------------------------------------------


def _default_concurrency() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Slots:
    size: int
    wait_seconds: float
    semaphore: threading.BoundedSemaphore


DEFAULT_DECODE_WAIT_SECONDS = 10.0
_slots = _Slots(_default_concurrency(), DEFAULT_DECODE_WAIT_SECONDS, threading.BoundedSemaphore(_default_concurrency()))


def decode_concurrency() -> tuple[int, float]:
    """(slots, wait seconds): how many images this process decodes at once (default: the CPUs it may run on),
    and how long a decode waits for a slot before ``DecoderBusy``."""
    return _slots.size, _slots.wait_seconds


def set_decode_concurrency(slots: int, wait_seconds: float = DEFAULT_DECODE_WAIT_SECONDS) -> None:
    """Decode at most ``slots`` images at once in this process, across all threads; a decode waits at most
    ``wait_seconds`` for a slot (decodes in flight finish in the slots they hold)."""
    global _slots
    if slots < 1 or wait_seconds < 0:
        raise ValueError(f"decode concurrency needs slots >= 1 and wait_seconds >= 0, got {slots}, {wait_seconds}")
    _slots = _Slots(slots, wait_seconds, threading.BoundedSemaphore(slots))


@contextlib.contextmanager
def _decode_slot() -> Iterator[None]:
    slots = _slots  # the semaphore this decode was admitted by, even if the setting changes meanwhile
    if not slots.semaphore.acquire(timeout=slots.wait_seconds):
        raise DecoderBusy(f"every image decode slot stayed busy for {slots.wait_seconds:g} s; try again")
    try:
        yield
    finally:
        slots.semaphore.release()


# Step 1: the byte stream --------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES: dict[str, Callable[[bytes], bool]] = {
    "PNG": lambda data: data.startswith(_PNG_SIGNATURE),
    "JPEG": lambda data: data.startswith(b"\xff\xd8\xff"),
    "WEBP": lambda data: data[:4] == b"RIFF" and data[8:12] == b"WEBP",
}
# The next JPEG marker: 0xFF, then a byte that is not 0x00 (a stuffed 0xFF inside entropy-coded data), 0xFF (a
# fill byte: the marker follows it) or RST0-7 (restart markers inside a scan, no segment of their own). A literal
# first byte lets the regex engine skip to each 0xFF at memchr speed (16 ms for 30 MB; `\xff+` takes 300 ms).
_JPEG_MARKER = re.compile(rb"\xff([\x01-\xcf\xd8-\xfe])")
_JPEG_STANDALONE = {0x01, 0xD8}  # TEM, SOI: no length field
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class _Header:
    format: str
    width: int
    height: int


def _inspect(data: bytes, name: str, limits: ImageLimits) -> _Header:
    """The format and size read off the byte stream, its structure checked against the limits. A stream that
    ends early or is malformed is left to Pillow (which says damaged or unreadable)."""
    fmt = next((f for f, matches in _SIGNATURES.items() if matches(data)), None)
    if fmt is None:
        raise _refused_format(data, name, limits)
    if fmt not in limits.formats:
        raise ImageFormatRefused(f"{name}: format {fmt} is not accepted; use {', '.join(limits.formats)}")
    width, height = {"PNG": _inspect_png, "JPEG": _inspect_jpeg, "WEBP": _inspect_webp}[fmt](data, name, limits)
    header = _Header(fmt, width, height)
    _check_size(header.width, header.height, name, limits)
    return header


def _refused_format(data: bytes, name: str, limits: ImageLimits) -> ImageError:
    """Name the format for the message by Pillow's signature checks only (no plugin parses anything)."""
    # lazy: loads PIL
    from PIL import Image

    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            recognised = accept is not None and accept(data[:16])
        except Exception:  # a plugin's check on too few bytes
            continue
        if recognised and not isinstance(recognised, str):  # a string: Pillow's "recognised, but cannot read"
            return ImageFormatRefused(f"{name}: format {fmt} is not accepted; use {', '.join(limits.formats)}")
    return ImageUnreadable(f"{name}: not a readable image (send PNG, JPEG or WebP)")


def _check_size(width: int, height: int, name: str, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} is over the limit of {limits.max_pixels:,} pixels")
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(
            f"{name}: {width}x{height} is too small; the shorter side must be at least {limits.min_side}"
        )


def _inspect_jpeg(data: bytes, name: str, limits: ImageLimits) -> tuple[int, int]:
    size: tuple[int, int] | None = None
    scans = segments = 0
    position = 2  # after SOI
    while (marker := _JPEG_MARKER.search(data, position)) is not None:
        code = marker.group(1)[0]
        position = marker.end()
        if code == 0xD9:  # EOI: what follows (an MPO's next picture, trailing bytes) is not decoded
            break
        if code in _JPEG_STANDALONE:
            continue
        segments += 1
        if segments > limits.max_segments:
            raise ImageTooComplex(f"{name}: more than {limits.max_segments} JPEG segments; re-save the image")
        if position + 2 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, position)
        if code in _JPEG_SOF and size is None and position + 7 <= len(data):
            height, width = struct.unpack_from(">HH", data, position + 3)
            size = (width, height)
        if code == 0xDA:
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise ImageTooComplex(
                    f"{name}: more than {limits.max_jpeg_scans} JPEG scans (a progressive JPEG has about 10); "
                    "re-save the image"
                )
        position += length  # past the segment; a scan's entropy-coded data is skipped by the marker search
    if size is None:
        raise ImageUnreadable(f"{name}: not a readable image (a JPEG without a frame header)")
    return size


def _inspect_png(data: bytes, name: str, limits: ImageLimits) -> tuple[int, int]:
    size: tuple[int, int] | None = None
    chunks = data_chunks = 0
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IHDR" and size is None and position + 16 <= len(data):
            size = struct.unpack_from(">II", data, position + 8)
        elif kind in (b"acTL", b"fcTL", b"fdAT"):
            raise ImageFormatRefused(f"{name}: an animated PNG (APNG) is not accepted; send a still image")
        if kind == b"IDAT":
            data_chunks += 1
            if data_chunks > limits.max_png_data_chunks:
                raise ImageTooComplex(f"{name}: more than {limits.max_png_data_chunks} PNG data chunks; re-save it")
        else:
            chunks += 1
            if chunks > limits.max_segments:
                raise ImageTooComplex(f"{name}: more than {limits.max_segments} PNG chunks; re-save the image")
        if kind == b"IEND":
            break
        position += 12 + length  # length, type, data, CRC
    if size is None:
        raise ImageUnreadable(f"{name}: not a readable image (a PNG without its header)")
    return size


def _inspect_webp(data: bytes, name: str, limits: ImageLimits) -> tuple[int, int]:
    size: tuple[int, int] | None = None
    chunks = 0
    position = 12  # RIFF, size, WEBP
    while position + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, position)
        body = data[position + 8 : position + 8 + min(length, 16)]
        chunks += 1
        if chunks > limits.max_segments:
            raise ImageTooComplex(f"{name}: more than {limits.max_segments} WebP chunks; re-save the image")
        if kind in (b"ANIM", b"ANMF") or (kind == b"VP8X" and body[:1] and body[0] & 0x02):
            raise ImageFormatRefused(f"{name}: an animated WebP is not accepted; send a still image")
        if size is None:
            size = _webp_size(kind, body)
        position += 8 + length + (length & 1)  # chunks are padded to an even size
    if size is None:
        raise ImageUnreadable(f"{name}: not a readable image (a WebP without its header)")
    return size


def _webp_size(kind: bytes, body: bytes) -> tuple[int, int] | None:
    if kind == b"VP8X" and len(body) >= 10:  # the canvas, 24-bit little-endian minus one
        return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
    if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":  # lossy: after the key frame tag
        width, height = struct.unpack_from("<HH", body, 6)
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:  # lossless: 14 bits each, minus one
        bits = int.from_bytes(body[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# Steps 2 and 3: Pillow ----------------------------------------------------------------------------------


class _BudgetSpent(Exception):
    pass


class _BudgetedBytes(io.BytesIO):
    """The image's bytes as Pillow's decoders read them, in blocks: a read after the decoding thread spent its
    CPU budget raises, which stops the decode between two blocks."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.deadline: float | None = None

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.thread_time() > self.deadline:
            raise _BudgetSpent
        return super().read(size)


# Bytes per decoder call: small enough that a highly compressible block (zlib reaches ~1000:1) is a few ms of
# work between two budget checks, large enough that a 20 MiB file is a few thousand calls.
_DECODE_BLOCK = 16 * 1024


@contextlib.contextmanager
def _decoded(data: bytes, name: str, limits: ImageLimits, draft: bool) -> Iterator[ImageFile]:
    """The image, checked, opened and decoded within its CPU budget (Pillow's image object, loaded), held in a
    decode slot until the caller's block ends (what it does with the pixels counts against the same bound);
    ``draft``: a JPEG at the smallest of 1/2, 1/4, 1/8 scale that keeps its shorter side ``limits.min_side``."""
    # lazy: loads PIL
    from PIL import Image, UnidentifiedImageError

    header = _inspect(data, name, limits)
    with _decode_slot():  # Pillow allocates from here on (a WebP's canvas already in Image.open)
        source = _BudgetedBytes(data)
        try:
            img = Image.open(source, formats=[header.format])
        except Image.DecompressionBombError:
            raise ImageTooLarge(f"{name}: the image is over the limit of {limits.max_pixels:,} pixels") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error):  # PIL's text: reprs
            raise ImageUnreadable(f"{name}: not a readable image (send PNG, JPEG or WebP)") from None
        with img:
            _load(img, source, name, limits, draft)
            yield img


def _load(img: ImageFile, source: _BudgetedBytes, name: str, limits: ImageLimits, draft: bool) -> None:
    # lazy: loads PIL
    from PIL import Image

    if img.format not in limits.formats:  # an MPO (several JPEGs in one file), say
        raise ImageFormatRefused(f"{name}: format {img.format} is not accepted; use {', '.join(limits.formats)}")
    if getattr(img, "n_frames", 1) != 1:
        raise ImageFormatRefused(f"{name}: an animated image is not accepted; send a still image")
    _check_size(*img.size, name, limits)
    if draft and img.format == "JPEG":
        img.draft(None, (limits.min_side, limits.min_side))
    img.decodermaxblock = _DECODE_BLOCK
    started = time.thread_time()
    source.deadline = started + limits.max_decode_seconds
    try:
        img.load()  # a truncated file fails here, not later in the middle of training
    except _BudgetSpent:
        pass
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError):  # PIL's text: reprs
        raise ImageDamaged(f"{name}: the image data is damaged (truncated or corrupt)") from None
    spent = time.thread_time() - started
    if spent > limits.max_decode_seconds:  # stopped by the budget, or a decoder that reads all at once (WebP)
        raise ImageTooComplex(
            f"{name}: decoding took over {limits.max_decode_seconds:g} s of CPU ({spent:.2f} s); re-save the image"
        )


def decode_image(data: bytes, name: str, limits: ImageLimits = ImageLimits()) -> SubjectImage:
    """Decode one image at full size: structure, size and pixel limits first (on the bytes, then on Pillow's
    header), the pixels in a decode slot within the CPU budget, EXIF orientation applied, converted to RGB.

    Raises an ImageError (a ValueError) naming the image: ImageUnreadable, ImageFormatRefused, ImageTooLarge,
    ImageTooSmall, ImageTooComplex or ImageDamaged; DecoderBusy when no decode slot came free in time.
    """
    # lazy: loads PIL
    from PIL import ImageOps

    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,}")
    with _decoded(data, name, limits, draft=False) as img:
        try:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, SyntaxError, ValueError, struct.error):  # PIL's text may carry reprs
            raise ImageDamaged(f"{name}: the image data is damaged (truncated or corrupt)") from None
        assert img.format is not None  # _load refused any other format
        return SubjectImage(name=name, pixels=np.asarray(rgb, dtype=np.uint8).copy(), format=img.format)


def validate_image(data: bytes, name: str, limits: ImageLimits = ImageLimits()) -> str:
    """Check that ``decode_image`` would accept the image, at less cost (the gateway keeps the bytes, not the
    pixels): a JPEG is decoded at 1/8 scale, the EXIF orientation and RGB conversion run on an 8x8 corner.
    Returns the format ("PNG", "JPEG", "WEBP"); raises what ``decode_image`` raises.
    """
    # lazy: loads PIL
    from PIL import ImageOps

    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,}")
    with _decoded(data, name, limits, draft=True) as img:
        try:  # the crop keeps the EXIF block, so its parsing is checked as decode_image does it
            ImageOps.exif_transpose(img.crop((0, 0, min(8, img.width), min(8, img.height)))).convert("RGB")
        except (OSError, SyntaxError, ValueError, struct.error):
            raise ImageDamaged(f"{name}: the image data is damaged (truncated or corrupt)") from None
        assert img.format is not None  # _load refused any other format
        return img.format


def list_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files (by extension) directly inside ``folder``, sorted by name."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"image folder {path} does not exist or is not a folder")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_subject_images(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
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
    pixels: np.ndarray = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return pixels


def encode_png(image: np.ndarray) -> bytes:
    """A float image in [0, 1] (H, W, 3), as ``to_uint8`` converts it, encoded as PNG bytes."""
    # lazy: loads PIL
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(image: np.ndarray, path: str | os.PathLike[str]) -> None:
    """A float image in [0, 1] (H, W, 3), as ``to_uint8`` converts it, saved in the format of the path's
    extension (Pillow's rule: ``.png`` is PNG)."""
    # lazy: loads PIL
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)

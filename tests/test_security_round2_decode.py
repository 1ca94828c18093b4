"""Security review, round 2: decoding uploaded photos (shared/images.py, used by the gateway and the workers).

The review's inputs, built here: a 155 KB PNG of 40 MP in one colour (~1 s of CPU and ~0.6 GB to decode), and a
progressive JPEG that repeats one small refinement scan 500 times (each repeat is another pass over every block:
~15 s at 36 MP in 240 KB). Both are now refused on the byte stream, before Pillow allocates anything; photos of
every accepted kind still decode; decodes share a process-wide number of slots; a decode over its CPU budget
stops. The pixel limit used is 16 MP, the default proposed for ``KRONA_MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers.api import Api, RecordingEnqueuer, image_files, png
from PIL import Image, PngImagePlugin

from shared.images import (
    DecoderBusy,
    ImageDamaged,
    ImageFormatRefused,
    ImageLimits,
    ImageTooComplex,
    ImageTooLarge,
    decode_concurrency,
    decode_image,
    set_decode_concurrency,
    validate_image,
)

ROOT = Path(__file__).resolve().parents[1]
PIXELS = 16_000_000
LIMITS = ImageLimits(max_pixels=PIXELS)
MiB = 1024 * 1024


# The review's inputs and ordinary photos ------------------------------------------------------------------


def _encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _photo(width: int = 1024, height: int = 768, seed: int = 0) -> Image.Image:
    """Smooth gradients with some noise: compresses like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


@pytest.fixture(scope="module")
def flat_png_40mp() -> bytes:
    """6400 x 6250 = 40,000,000 pixels of one colour: ~130 KB."""
    return _encode(Image.new("RGB", (6400, 6250), (200, 30, 60)), format="PNG", compress_level=9)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG; a scan's end includes its entropy-coded data."""
    segments, position = [], 2
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + struct.unpack_from(">H", data, position + 2)[0]
        while marker == 0xDA:  # to the next marker: not a stuffed 0xFF00, not a restart marker
            end = data.index(b"\xff", end)
            if data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7:
                break
            end += 2
        segments.append((marker, position, end))
        position = end
    return segments


def _progressive_jpeg(width: int, height: int, repeat_last_scan: int = 0) -> bytes:
    """A progressive JPEG of one colour; its last scan (a small AC refinement scan) repeated before EOI."""
    data = _encode(Image.new("RGB", (width, height), (120, 180, 90)), format="JPEG", progressive=True, quality=90)
    segments = _jpeg_segments(data)
    _, start, end = [s for s in segments if s[0] == 0xDA][-1]
    eoi = segments[-1][1]
    return data[:eoi] + data[start:end] * repeat_last_scan + data[eoi:]


@pytest.fixture(scope="module")
def repeated_scan_jpeg() -> bytes:
    """36 MP, 500 copies of one refinement scan."""
    data = _progressive_jpeg(6000, 6000, repeat_last_scan=500)
    assert data.count(b"\xff\xda") > 500 and len(data) < 300_000
    return data


def _thread_cpu(call):
    """(result or exception, CPU seconds of this thread, tracemalloc peak bytes)."""
    tracemalloc.start()
    started = time.thread_time()
    try:
        result = call()
    except Exception as exc:  # the test asserts which
        result = exc
    seconds = time.thread_time() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def _child_peak_rss_growth(data: bytes, tmp_path: Path, max_pixels: int) -> dict:
    """Decode ``data`` with validate_image and decode_image in a fresh interpreter; what each raised, and how
    much its peak RSS grew (KiB) across the two calls. Pillow's C allocations are invisible to tracemalloc."""
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    script = f"""
import json, resource, sys
from PIL import Image
Image.init()
from shared.images import ImageLimits, decode_image, validate_image
import PIL.JpegImagePlugin, PIL.PngImagePlugin, PIL.WebPImagePlugin
data = open({str(path)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raised = []
for call in (validate_image, decode_image):
    try:
        call(data, "x", ImageLimits(max_pixels={max_pixels}))
        raised.append(None)
    except Exception as exc:
        raised.append(type(exc).__name__)
print(json.dumps({{"raised": raised, "kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# The review's inputs: refused before decoding ------------------------------------------------------------


def test_a_40_mp_png_of_one_colour_is_refused_on_its_header(flat_png_40mp, tmp_path):
    assert len(flat_png_40mp) < 200_000
    for call in (validate_image, decode_image):
        result, seconds, peak = _thread_cpu(lambda call=call: call(flat_png_40mp, "flat.png", LIMITS))
        assert isinstance(result, ImageTooLarge) and "6400x6250" in str(result), result
        assert seconds < 0.5 and peak < 10 * MiB, (seconds, peak)
    child = _child_peak_rss_growth(flat_png_40mp, tmp_path, PIXELS)
    assert child["raised"] == ["ImageTooLarge", "ImageTooLarge"] and child["kib"] < 32 * 1024, child


def test_a_jpeg_repeating_a_refinement_scan_500_times_is_refused_before_decoding(repeated_scan_jpeg, tmp_path):
    # Over the pixel limit and within it: the scan count refuses it first either way.
    for limits in (LIMITS, ImageLimits(max_pixels=40_000_000)):
        for call in (validate_image, decode_image):
            result, seconds, peak = _thread_cpu(lambda call=call, limits=limits: call(repeated_scan_jpeg, "s", limits))
            assert isinstance(result, ImageTooComplex) and "more than 32 JPEG scans" in str(result), result
            assert seconds < 0.5 and peak < 10 * MiB, (seconds, peak)
    small = _progressive_jpeg(2000, 2000, repeat_last_scan=500)  # 4 MP: the scan count alone refuses it
    result, seconds, peak = _thread_cpu(lambda: validate_image(small, "scans.jpg", LIMITS))
    assert isinstance(result, ImageTooComplex) and "more than 32 JPEG scans" in str(result), result
    assert seconds < 0.5 and peak < 10 * MiB, (seconds, peak)
    child = _child_peak_rss_growth(repeated_scan_jpeg, tmp_path, 40_000_000)
    assert child["raised"] == ["ImageTooComplex", "ImageTooComplex"] and child["kib"] < 32 * 1024, child


def test_a_jpeg_at_the_scan_limit_decodes_within_its_budget():
    """The costliest JPEG of this kind still accepted: 16 MP, 32 scans (~0.4 s of CPU on a 2024 x86 core)."""
    data = _progressive_jpeg(4000, 4000, repeat_last_scan=22)
    assert data.count(b"\xff\xda") == 32
    result, seconds, _ = _thread_cpu(lambda: decode_image(data, "32 scans.jpg", LIMITS))
    assert result.pixels.shape == (4000, 4000, 3) and seconds < LIMITS.max_decode_seconds
    over = _progressive_jpeg(4000, 4000, repeat_last_scan=23)
    with pytest.raises(ImageTooComplex):
        validate_image(over, "33 scans.jpg", LIMITS)


# Photos still decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("JPEG", {"quality": 90}),
        ("JPEG", {"quality": 90, "progressive": True}),
        ("JPEG", {"quality": 90, "progressive": True, "optimize": True, "subsampling": 0}),
        ("PNG", {}),
        ("PNG", {"compress_level": 1}),
        ("WEBP", {"quality": 80}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_ordinary_photos_are_accepted(fmt, options):
    photo = _photo()
    data = _encode(photo, format=fmt, **options)
    assert validate_image(data, "photo", LIMITS) == fmt
    decoded = decode_image(data, "photo", LIMITS)
    assert decoded.format == fmt and decoded.pixels.shape == (768, 1024, 3)
    if fmt != "JPEG" and not options.get("quality"):
        assert np.array_equal(decoded.pixels, np.asarray(photo))


def test_grey_palette_and_alpha_pngs_are_accepted():
    for mode in ("L", "P", "RGBA", "LA", "I;16"):
        image = _photo(200, 100).convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image).astype(np.uint16) * 256)
        data = _encode(image, format="PNG")
        assert validate_image(data, mode, LIMITS) == "PNG"
        assert decode_image(data, mode, LIMITS).pixels.shape == (100, 200, 3)


def test_scan_counting_is_not_fooled_by_markers_inside_segments():
    """An APP1 segment (EXIF, XMP) may hold a whole thumbnail JPEG, or any bytes: its SOS markers do not count."""
    photo = _encode(_photo(), format="JPEG", quality=85)
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 100
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = photo[:2] + segment + photo[2:]
    assert data.count(b"\xff\xda") > 100
    assert validate_image(data, "exif.jpg", LIMITS) == "JPEG"
    # Restart markers inside the entropy-coded data are not segments either.
    restarts = _encode(_photo(), format="JPEG", quality=85, restart_marker_blocks=1)
    assert validate_image(restarts, "restarts.jpg", LIMITS) == "JPEG"


# Structure limits ---------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_animated_images_are_refused():
    frames = [_photo(128, 96, seed) for seed in range(3)]
    apng = _encode(frames[0], format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFormatRefused, match="animated PNG"):
        validate_image(apng, "a.png", LIMITS)
    webp = _encode(frames[0], format="WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFormatRefused, match="animated WebP"):
        validate_image(webp, "a.webp", LIMITS)
    gif = _encode(frames[0], format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFormatRefused, match="format GIF is not accepted"):
        validate_image(gif, "a.gif", LIMITS)
    tiff = _encode(frames[0], format="TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFormatRefused, match="format TIFF is not accepted"):
        validate_image(tiff, "a.tif", LIMITS)


def test_chunk_and_segment_floods_are_refused_fast():
    photo = _encode(_photo(256, 256), format="PNG")
    ihdr_end = 8 + 25
    texts = b"".join(_png_chunk(b"tEXt", b"k\x00v") for _ in range(LIMITS.max_segments + 1))
    flooded = photo[:ihdr_end] + texts + photo[ihdr_end:]
    result, seconds, _ = _thread_cpu(lambda: validate_image(flooded, "text.png", LIMITS))
    assert isinstance(result, ImageTooComplex) and "PNG chunks" in str(result) and seconds < 0.5

    raw = b"".join(b"\x00" + bytes(256 * 3) for _ in range(256))  # filter byte + one black row, 256 rows
    stream = zlib.compress(raw)
    tiny_idats = b"".join(_png_chunk(b"IDAT", stream[i : i + 1]) for i in range(len(stream)))
    tiny_idats += b"".join(_png_chunk(b"IDAT", b"") for _ in range(LIMITS.max_png_data_chunks))
    header = photo[:ihdr_end]
    many_idat = header + tiny_idats + _png_chunk(b"IEND", b"")
    result, seconds, _ = _thread_cpu(lambda: validate_image(many_idat, "idat.png", LIMITS))
    assert isinstance(result, ImageTooComplex) and "data chunks" in str(result) and seconds < 0.5
    fine = header + b"".join(_png_chunk(b"IDAT", stream[i : i + 64]) for i in range(0, len(stream), 64))
    assert validate_image(fine + _png_chunk(b"IEND", b""), "fine.png", LIMITS) == "PNG"

    jpeg = _encode(_photo(256, 256), format="JPEG")
    comments = b"\xff\xfe\x00\x03x" * (LIMITS.max_segments + 1)
    result, seconds, _ = _thread_cpu(lambda: validate_image(jpeg[:2] + comments + jpeg[2:], "com.jpg", LIMITS))
    assert isinstance(result, ImageTooComplex) and "JPEG segments" in str(result) and seconds < 0.5


def test_damaged_files_are_still_found_at_draft_scale():
    data = _encode(_photo(), format="JPEG", quality=90, progressive=True)
    for cut in (len(data) // 2, len(data) - 200):
        with pytest.raises(ImageDamaged):
            validate_image(data[:cut], "cut.jpg", LIMITS)
        with pytest.raises(ImageDamaged):
            decode_image(data[:cut], "cut.jpg", LIMITS)


def test_a_decode_over_its_cpu_budget_stops_early(flat_png_40mp):
    """Within the byte, pixel and structure limits but slow (here: a 40 MP limit and a 0.05 s budget): the decoder
    is stopped between two blocks, well before the ~0.5 s the whole image takes."""
    limits = ImageLimits(max_pixels=40_000_000, max_decode_seconds=0.05)
    result, seconds, _ = _thread_cpu(lambda: validate_image(flat_png_40mp, "slow.png", limits))
    assert isinstance(result, ImageTooComplex) and "of CPU" in str(result), result
    assert seconds < 0.25, seconds


# Concurrency --------------------------------------------------------------------------------------------


@pytest.fixture
def decode_slots():
    """Restore the process's decode concurrency after the test."""
    saved = decode_concurrency()
    yield set_decode_concurrency
    set_decode_concurrency(*saved)


def _peak_concurrent_decodes(monkeypatch, threads: int) -> int:
    """Decode ``threads`` PNGs at once; the most that were inside Pillow's decoder at the same time."""
    lock, active, peak = threading.Lock(), [0], [0]
    original = PngImagePlugin.PngImageFile.load

    def load(self):
        if not self.tile:  # already decoded (crop and convert call load again)
            return original(self)
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)  # long enough that every thread asks for a slot meanwhile
            return original(self)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    data = _encode(_photo(256, 256), format="PNG")
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def decode(index: int) -> None:
        barrier.wait()
        try:
            (validate_image if index % 2 else decode_image)(data, f"{index}.png", LIMITS)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=decode, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    return peak[0]


def test_concurrent_decodes_are_capped_by_the_process_wide_slots(decode_slots, monkeypatch):
    assert decode_concurrency()[0] >= 1
    decode_slots(2)
    assert _peak_concurrent_decodes(monkeypatch, threads=12) <= 2
    decode_slots(6)  # the instrument sees overlaps when they are allowed
    assert 2 < _peak_concurrent_decodes(monkeypatch, threads=12) <= 6


def test_the_gateway_answers_503_when_no_decode_slot_comes_free(decode_slots, tmp_path):
    from services.gateway.errors import status_of
    from services.gateway.services.trainings import decode_uploaded_images
    from shared.errors import Unavailable
    from shared.images import _decode_slot
    from shared.settings import Settings

    settings = Settings(data_dir=tmp_path, max_image_pixels=PIXELS)
    decode_slots(1, 0.2)
    with _decode_slot():  # another request holds the only slot
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            decode_uploaded_images(settings, [("a.png", png(0))])
        waited = time.monotonic() - started
    assert status_of(raised.value) == 503 and raised.value.code == "decoder_busy"
    assert 0.15 < waited < 2, waited
    with pytest.raises(DecoderBusy), _decode_slot(), _decode_slot():
        pass
    assert decode_uploaded_images(settings, [("a.png", png(0))])[0][1] == "png"


# Through the API ----------------------------------------------------------------------------------------


@pytest.fixture
def api16(postgres_url, tiny_folders, tmp_path):
    """The gateway (as the ``api`` fixture) with KRONA_MAX_IMAGE_PIXELS at the proposed 16 MP."""
    import uuid

    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant

    settings = Settings(
        database_url=postgres_url,
        data_dir=tmp_path,
        blob_dir=tmp_path / "blobs",
        base_model="tiny-sd",
        max_image_pixels=PIXELS,
    )
    enqueuer = RecordingEnqueuer()
    app = create_app(settings, enqueuer=enqueuer, storage=LocalStorage(tmp_path / "blobs"))
    with app.state.context.sessions() as session:
        _, key = create_tenant(session, f"acme-{uuid.uuid4().hex[:6]}")
        session.commit()
    with TestClient(app) as client:
        yield Api(client=client, context=app.state.context, enqueuer=enqueuer, keys={"acme": key})
    app.state.context.engine.dispose()


def _post(api, name: str, data: bytes, mime: str):
    files = [("images", (name, data, mime)), *image_files(1)]
    started = time.monotonic()
    response = api.client.post(
        "/v1/trainings", headers=api.headers(), data={"instance_prompt": "a photo of sks dog"}, files=files
    )
    return response, time.monotonic() - started


def test_the_gateway_refuses_the_review_inputs_fast_and_stores_nothing(api16, flat_png_40mp, repeated_scan_jpeg):
    blobs = Path(api16.context.settings.blob_dir)
    small_scans = _progressive_jpeg(2000, 2000, repeat_last_scan=500)
    for name, data, mime, status in (
        ("flat.png", flat_png_40mp, "image/png", 413),
        ("scans.jpg", repeated_scan_jpeg, "image/jpeg", 422),
        ("scans-4mp.jpg", small_scans, "image/jpeg", 422),
    ):
        response, seconds = _post(api16, name, data, mime)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_image" and name in error["message"]
        assert seconds < 2.0, (name, seconds)  # the decode alone took 0.9 s and 15 s before
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    assert api16.enqueuer.sent == []


def test_the_gateway_accepts_ordinary_progressive_jpegs_and_webps(api16):
    photo = _photo()
    for name, data, mime in (
        ("p.jpg", _encode(photo, format="JPEG", quality=90, progressive=True), "image/jpeg"),
        ("p.webp", _encode(photo, format="WEBP", quality=80), "image/webp"),
        ("p.png", _encode(photo, format="PNG"), "image/png"),
    ):
        response, _ = _post(api16, name, data, mime)
        assert response.status_code == 202, response.text

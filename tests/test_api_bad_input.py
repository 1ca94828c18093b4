"""Bad requests: each answers 4xx with the error shape and writes nothing to the database or storage."""

import io
import struct
import zlib

import pytest
from helpers.api import image_files, native_adapter_file, png
from safetensors.numpy import save as save_safetensors
from sqlalchemy import func, select

from shared.db import Adapter, Batch, Generation, IdempotencyKey, Training


def _png_header_bomb(width=20000, height=20000) -> bytes:
    """A valid PNG signature and IHDR claiming 20000x20000, with a tiny compressed body."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    )


def _small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 96)).save(buffer, format="GIF")
    return buffer.getvalue()


def _training(data=None, files=None):
    base = {"instance_prompt": "a photo of sks dog"}
    return (
        "post",
        "/v1/trainings",
        {"data": {**base, **(data or {})}, "files": files if files is not None else image_files(2)},
    )


def _gen(body):
    return ("post", "/v1/generations", {"json": body})


def _adapter(content: bytes, data=None):
    return (
        "post",
        "/v1/adapters",
        {"files": {"file": ("a.safetensors", content, "application/octet-stream")}, "data": data or {}},
    )


CASES = {
    "non-image file": (
        _training(files=[("images", ("a.png", b"hello, not an image", "image/png")), *image_files(1)]),
        415,
    ),
    "truncated image": (_training(files=[("images", ("a.png", png(1)[:300], "image/png")), *image_files(1)]), 422),
    "20000x20000 PNG header bomb": (
        _training(files=[("images", ("b.png", _png_header_bomb(), "image/png")), *image_files(1)]),
        413,
    ),
    "image too small": (_training(files=[("images", ("s.png", _small_png(), "image/png")), *image_files(1)]), 422),
    "GIF is not accepted": (_training(files=[("images", ("g.gif", _gif(), "image/gif")), *image_files(1)]), 415),
    "one image only": (_training(files=image_files(1)), 422),
    "no images (a plain form, not multipart)": (_training(files=[]), 415),
    "too many files": (_training(files=image_files(21)), 413),
    "empty prompt": (_training(data={"instance_prompt": "   "}), 422),
    "missing prompt": (("post", "/v1/trainings", {"data": {}, "files": image_files(2)}), 422),
    "steps out of range": (_training(data={"params": '{"steps": 0}'}), 422),
    "steps over the server limit": (_training(data={"params": '{"steps": 999999}'}), 422),
    "a1 not dividing the base model's dims": (_training(data={"params": '{"a1": 48}'}), 422),
    "a2 not dividing": (_training(data={"params": '{"a2": 7}'}), 422),
    "unknown target module": (_training(data={"params": '{"target_modules": ["to_qq"]}'}), 422),
    "malformed params JSON": (_training(data={"params": '{"steps": 10'}), 422),
    "params not an object": (_training(data={"params": "[1, 2]"}), 422),
    "unknown param": (_training(data={"params": '{"rank": 4}'}), 422),
    "learning rate negative": (_training(data={"params": '{"learning_rate": -1}'}), 422),
    "webhook to 127.0.0.1": (_training(data={"webhook_url": "http://127.0.0.1:9/hook"}), 422),
    "webhook to a private address": (_training(data={"webhook_url": "http://10.0.0.5/hook"}), 422),
    "webhook not http": (_training(data={"webhook_url": "ftp://example.com/x"}), 422),
    "JSON body to the multipart route": (("post", "/v1/trainings", {"json": {"instance_prompt": "x"}}), 415),
    "unknown adapter": (_gen({"prompt": "x", "adapter_id": "adp_000000000000000000000000"}), 404),
    "adapter_scale 5": (_gen({"prompt": "x", "adapter_scale": 5}), 422),
    "num_images 9": (_gen({"prompt": "x", "num_images": 9}), 422),
    "width not a multiple of 8": (_gen({"prompt": "x", "width": 100}), 422),
    "empty generation prompt": (_gen({"prompt": ""}), 422),
    "unknown generation field": (_gen({"prompt": "x", "sampler": "euler"}), 422),
    "generation webhook to localhost": (_gen({"prompt": "x", "webhook_url": "http://localhost/x"}), 422),
    "malformed JSON body": (
        ("post", "/v1/generations", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        422,
    ),
    "empty batch": (("post", "/v1/batches", {"json": {"generations": []}}), 422),
    "batch with one bad item": (
        ("post", "/v1/batches", {"json": {"generations": [{"prompt": "ok"}, {"prompt": "x", "num_images": 0}]}}),
        422,
    ),
    "adapter upload not safetensors": (_adapter(b"this is not a tensor file"), 422),
    "adapter upload with NaN": (_adapter("nan"), 422),
    "adapter upload wrong shapes": (_adapter("wrong-shape"), 422),
    "adapter upload for another base model": (_adapter("ok", data={"base_model": "stabilityai/sdxl"}), 422),
    "adapter upload foreign keys": (
        _adapter(save_safetensors({"lora_unet_x.lora_down.weight": __import__("numpy").zeros((2, 2), "float32")})),
        422,
    ),
    "oversized body": (
        (
            "post",
            "/v1/generations",
            {"content": b"x", "headers": {"Content-Type": "application/json", "Content-Length": str(10**10)}},
        ),
        413,
    ),
}


def _resolve_adapter_content(kind: str) -> bytes:
    import numpy as np
    from safetensors.numpy import load

    native = load(native_adapter_file())
    key = sorted(native)[0]
    if kind == "nan":
        native[key] = np.full_like(native[key], np.nan)
    elif kind == "wrong-shape":
        native[key] = np.zeros((8, 8), np.float32)
    from shared.krona.config import KronaConfig
    from shared.krona.convert import adapter_bytes

    return adapter_bytes(native, KronaConfig(), {})


def _counts(api):
    with api.context.sessions() as session:
        rows = tuple(
            session.scalar(select(func.count()).select_from(m))
            for m in (Training, Generation, Batch, Adapter, IdempotencyKey)
        )
    return rows, sorted(api.context.storage.list(""))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_is_refused_and_writes_nothing(api, case):
    (method, path, kwargs), expected = CASES[case]
    kwargs = dict(kwargs)
    files = kwargs.get("files")
    if isinstance(files, dict) and isinstance(files["file"][1], str):
        kwargs["files"] = {
            "file": ("a.safetensors", _resolve_adapter_content(files["file"][1]), "application/octet-stream")
        }
    headers = {**api.headers(**{"Idempotency-Key": f"bad-{case}"}), **kwargs.pop("headers", {})}
    before = _counts(api)
    response = getattr(api.client, method)(path, headers=headers, **kwargs)
    assert response.status_code == expected, (case, response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] and error["message"]
    assert _counts(api) == before, case
    assert api.enqueuer.sent == []


def test_at_least_25_cases():
    assert len(CASES) >= 25

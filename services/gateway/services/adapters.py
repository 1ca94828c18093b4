"""Uploading an adapter: the file checked and converted (off the event loop), stored, and its row committed."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

from fastapi import UploadFile
from sqlalchemy.orm import Session

from shared.db import Adapter, Tenant, new_id
from shared.krona.convert import adapter_bytes, native_arrays_from_upload, read_safetensors_bytes
from shared.schemas import adapter_public
from shared.settings import Settings

from ..context import AppContext
from ..errors import ApiError

__all__ = ["AdapterUpload", "read_upload_form", "store_upload"]

MAX_ADAPTER_BYTES = 256 * 1024 * 1024
MAX_NAME_CHARS = 200
MAX_BASE_MODEL_CHARS = 300


def _convert_upload(context: AppContext, data: bytes, label: str):
    """(stored native file, its arrays, config) for an uploaded file; ValueError if it is not a valid adapter.

    Names and shapes are checked against the base model before any arithmetic (see plan_lokr_module).
    """
    arrays, metadata = read_safetensors_bytes(data, label)
    native, config, source = native_arrays_from_upload(arrays, metadata, context.base_model_shapes())
    stored = adapter_bytes(
        native, config, {"base_model": context.settings.base_model, "created_by": f"upload ({source})"}
    )
    return stored, native, config


def store_upload(
    *, context: AppContext, session: Session, tenant: Tenant, data: bytes, label: str | None, name: str | None
) -> dict[str, Any]:
    """Convert, store and record an uploaded adapter; the new Adapter's public body (422/503 otherwise)."""
    try:
        stored, native, config = _convert_upload(context, data, label or "file")
    except ValueError as exc:
        raise ApiError(422, "invalid_adapter", str(exc)) from None
    adapter_id = new_id("adp")
    key = f"tenants/{tenant.id}/adapters/{adapter_id}.safetensors"
    try:
        context.storage.put_bytes(key, stored)
    except Exception:
        raise ApiError(503, "storage_unavailable", "could not store the adapter; try again") from None
    row = Adapter(
        id=adapter_id,
        tenant_id=tenant.id,
        name=name,
        base_model=context.settings.base_model,
        config=config.to_metadata(),
        num_parameters=int(sum(a.size for a in native.values())),
        size_bytes=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        storage_key=key,
    )
    session.add(row)
    try:
        session.commit()
    except Exception:
        session.rollback()
        with contextlib.suppress(Exception):  # best effort: storage may be down too
            context.storage.delete(key)
        raise
    return adapter_public(row)


@dataclass(frozen=True)
class AdapterUpload:
    data: bytes
    label: str
    name: str | None


async def read_upload_form(
    settings: Settings, *, file: UploadFile, name: str | None, base_model: str | None
) -> AdapterUpload:
    """The uploaded file's bytes and the form's fields (parsed by FastAPI), with every limit that needs no
    parsing of the file checked."""
    for field, value in (("name", name), ("base_model", base_model)):
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ApiError(422, "invalid_request", f"{field} must not contain NUL characters")
    data = await file.read(MAX_ADAPTER_BYTES + 1)
    if len(data) > MAX_ADAPTER_BYTES:
        raise ApiError(413, "adapter_too_large", f"adapter files are limited to {MAX_ADAPTER_BYTES:,} bytes")
    if base_model and base_model != settings.base_model:
        raise ApiError(422, "base_model_mismatch", f"this server serves {settings.base_model!r}, not {base_model!r}")
    return AdapterUpload(data=data, label=file.filename or "file", name=name)

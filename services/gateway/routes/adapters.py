"""/v1/adapters: list, inspect, download (native or LyCORIS), upload, delete."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from shared.db import Adapter, Tenant, new_id
from shared.krona.convert import adapter_bytes, lycoris_arrays, native_arrays_from_upload, read_safetensors_bytes
from shared.schemas import AdapterPublic, Page, adapter_public
from shared.storage import BlobNotFound

from ..context import AppContext
from ..deps import ContextDep, CurrentTenant, SessionDep
from ..errors import ApiError
from ..jobs import CursorParam, created, get_owned, page
from ..openapi import errors

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=errors(401, 422, 503))

MAX_ADAPTER_BYTES = 256 * 1024 * 1024
# Caps on the free-text form fields (String(200) and String(300) columns).
MAX_NAME_CHARS = 200
MAX_BASE_MODEL_CHARS = 300

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "a native Krona or LyCORIS LoKr safetensors file whose factors fit the "
                            "server's base model; at most 256 MiB",
                        },
                        "name": {"type": "string", "maxLength": MAX_NAME_CHARS},
                        "base_model": {
                            "type": "string",
                            "maxLength": MAX_BASE_MODEL_CHARS,
                            "description": "must be the server's base model",
                        },
                    },
                }
            }
        },
    }
}


@router.get("", response_model=Page[AdapterPublic], summary="List adapters, newest first", responses=errors(400))
def list_adapters(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: CursorParam = None,
):
    rows, next_cursor = page(session, Adapter, tenant, limit=limit, cursor=cursor)
    return {"data": [adapter_public(r) for r in rows], "next_cursor": next_cursor}


@router.get("/{adapter_id}", response_model=AdapterPublic, summary="One adapter", responses=errors(404))
def get_adapter(adapter_id: str, session: SessionDep, tenant: CurrentTenant):
    return adapter_public(get_owned(session, Adapter, adapter_id, tenant, "adapter"))


@router.get(
    "/{adapter_id}/file",
    summary="Download the adapter: native Krona or kohya/LyCORIS LoKr safetensors",
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(404)},
    response_class=Response,
)
def download_adapter_file(
    adapter_id: str,
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    format: Literal["krona", "lycoris"] = "krona",
):
    row = get_owned(session, Adapter, adapter_id, tenant, "adapter")
    try:
        data = context.storage.get_bytes(row.storage_key)
    except BlobNotFound:
        raise ApiError(404, "adapter_file_missing", f"the file of adapter {adapter_id} is missing") from None
    headers = {"Content-Disposition": f'attachment; filename="{adapter_id}.{format}.safetensors"'}
    if format == "krona":
        return Response(data, media_type="application/octet-stream", headers=headers)
    from safetensors.numpy import save

    arrays, _ = read_safetensors_bytes(data, adapter_id)
    lokr, not_rebuildable = lycoris_arrays(arrays)
    meta = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": row.base_model}
    if not_rebuildable:
        headers["X-Krona-Note"] = (
            "loads in ComfyUI/A1111/Forge; the lycoris-lora Python library cannot rebuild these factor shapes"
        )
    return Response(save(lokr, metadata=meta), media_type="application/octet-stream", headers=headers)


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


@router.post(
    "",
    status_code=201,
    response_model=AdapterPublic,
    openapi_extra=UPLOAD_SCHEMA,
    summary="Upload an adapter",
    responses=errors(400, 413, 415),
)
async def upload_adapter(request: Request, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a 'file' field")
    try:
        form = await request.form(max_files=1, max_fields=5, max_part_size=1024 * 1024)
    except Exception as exc:
        raise ApiError(400, "invalid_multipart", f"could not read the form: {getattr(exc, 'detail', exc)}") from None
    for field, limit in (("name", MAX_NAME_CHARS), ("base_model", MAX_BASE_MODEL_CHARS)):
        value = form.get(field)
        if isinstance(value, str) and len(value) > limit:
            raise ApiError(422, "invalid_request", f"{field} is limited to {limit} characters (got {len(value):,})")
        if isinstance(value, str) and "\x00" in value:  # PostgreSQL text cannot hold NUL
            raise ApiError(422, "invalid_request", f"{field} must not contain NUL characters")
    upload = form.get("file")
    if upload is None or not hasattr(upload, "read"):
        raise ApiError(422, "invalid_request", "the 'file' field is required")
    data = await upload.read(MAX_ADAPTER_BYTES + 1)
    if len(data) > MAX_ADAPTER_BYTES:
        raise ApiError(413, "adapter_too_large", f"adapter files are limited to {MAX_ADAPTER_BYTES:,} bytes")
    base_model = form.get("base_model") if isinstance(form.get("base_model"), str) else None
    if base_model and base_model != context.settings.base_model:
        raise ApiError(
            422, "base_model_mismatch", f"this server serves {context.settings.base_model!r}, not {base_model!r}"
        )
    name = form.get("name") if isinstance(form.get("name"), str) else None
    # Parsing, converting, storing and committing are blocking work: the threadpool, not the event loop.
    return await run_in_threadpool(
        _store_upload, context=context, session=session, tenant=tenant, data=data, label=upload.filename, name=name
    )


def _store_upload(
    *, context: AppContext, session: Session, tenant: Tenant, data: bytes, label: str | None, name: str | None
) -> JSONResponse:
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
    return created(adapter_public(row), 201, "adapters")


@router.delete(
    "/{adapter_id}",
    status_code=204,
    summary="Delete an adapter and its file",
    responses=errors(404),
    response_class=Response,
)
def delete_adapter(adapter_id: str, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    row = get_owned(session, Adapter, adapter_id, tenant, "adapter")
    key = row.storage_key
    session.delete(row)
    session.commit()
    context.storage.delete(key)
    return Response(status_code=204)

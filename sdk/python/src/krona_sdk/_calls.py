"""Every API operation as a ``Call``: built here once, sent by the synchronous and the asynchronous client."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from ._base import Call
from ._files import FileInput, ImagesInput, read_file, read_images
from .models import (
    Adapter,
    ApiKey,
    Batch,
    Capabilities,
    Generation,
    Page,
    Tenant,
    TenantCreated,
    Training,
    Usage,
    WebhookSecret,
)

ADAPTER_FORMATS = ("krona", "lycoris")
GENERATION_FIELDS = (
    "adapter_id",
    "adapter_scale",
    "negative_prompt",
    "num_images",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
    "webhook_url",
)


def _id(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected an id such as trn_…, got {value!r}")
    return quote(value, safe="")


def _idempotency(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` of a create: the caller's, else a new one (the same on every retry of the call)."""
    return {"Idempotency-Key": key or str(uuid.uuid4())}


def _params_text(params: Mapping[str, Any] | str | None) -> str | None:
    if params is None or isinstance(params, str):
        return params
    return json.dumps(dict(params))


# trainings ---------------------------------------------------------------------------------------------------


def create_training(
    images: ImagesInput,
    instance_prompt: str,
    params: Mapping[str, Any] | str | None,
    name: str | None,
    webhook_url: str | None,
    idempotency_key: str | None,
) -> Call:
    data = {
        "instance_prompt": instance_prompt,
        "params": _params_text(params),
        "name": name,
        "webhook_url": webhook_url,
    }
    return Call(
        "POST", "/v1/trainings", data=data, files=read_images(images), headers=_idempotency(idempotency_key),
        model=Training,
    )  # fmt: skip


def list_trainings(status: str | None, limit: int | None, cursor: str | None) -> Call:
    params = {"status": status, "limit": limit, "cursor": cursor}
    return Call("GET", "/v1/trainings", params=params, model=Page[Training])


def get_training(training_id: str) -> Call:
    return Call("GET", f"/v1/trainings/{_id(training_id)}", model=Training)


def cancel_training(training_id: str) -> Call:
    return Call("POST", f"/v1/trainings/{_id(training_id)}/cancel", model=Training)


def delete_training(training_id: str) -> Call:
    return Call("DELETE", f"/v1/trainings/{_id(training_id)}")


def training_events_path(training_id: str) -> str:
    return f"/v1/trainings/{_id(training_id)}/events"


# adapters ----------------------------------------------------------------------------------------------------


def list_adapters(limit: int | None, cursor: str | None) -> Call:
    return Call("GET", "/v1/adapters", params={"limit": limit, "cursor": cursor}, model=Page[Adapter])


def get_adapter(adapter_id: str) -> Call:
    return Call("GET", f"/v1/adapters/{_id(adapter_id)}", model=Adapter)


def delete_adapter(adapter_id: str) -> Call:
    return Call("DELETE", f"/v1/adapters/{_id(adapter_id)}")


def upload_adapter(file: FileInput, name: str | None, base_model: str | None) -> Call:
    filename, data = read_file(file, "adapter.safetensors")
    files = [("file", (filename, data, "application/octet-stream"))]
    return Call(
        "POST", "/v1/adapters", data={"name": name, "base_model": base_model}, files=files, idempotent=False,
        model=Adapter,
    )  # fmt: skip


def download_adapter(adapter_id: str, format: str) -> Call:
    if format not in ADAPTER_FORMATS:
        raise ValueError(f"format must be one of {', '.join(ADAPTER_FORMATS)}, got {format!r}")
    return Call("GET", f"/v1/adapters/{_id(adapter_id)}/file", params={"format": format}, raw=True)


def evaluate_adapter(adapter_id: str, images: ImagesInput, params: Mapping[str, Any] | str | None) -> Call:
    return Call(
        "POST", f"/v1/adapters/{_id(adapter_id)}/evaluations", data={"params": _params_text(params)},
        files=read_images(images), idempotent=False, model=Adapter,
    )  # fmt: skip


# generations and batches -------------------------------------------------------------------------------------


def generation_body(prompt: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(GENERATION_FIELDS))
    if unknown:
        raise TypeError(f"unknown generation fields: {', '.join(unknown)} (known: {', '.join(GENERATION_FIELDS)})")
    return {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}


def create_generation(prompt: str, fields: Mapping[str, Any], idempotency_key: str | None) -> Call:
    body = generation_body(prompt, fields)
    return Call("POST", "/v1/generations", json=body, headers=_idempotency(idempotency_key), model=Generation)


def list_generations(
    status: str | None, adapter_id: str | None, batch_id: str | None, limit: int | None, cursor: str | None
) -> Call:
    params = {"status": status, "adapter_id": adapter_id, "batch_id": batch_id, "limit": limit, "cursor": cursor}
    return Call("GET", "/v1/generations", params=params, model=Page[Generation])


def get_generation(generation_id: str) -> Call:
    return Call("GET", f"/v1/generations/{_id(generation_id)}", model=Generation)


def delete_generation(generation_id: str) -> Call:
    return Call("DELETE", f"/v1/generations/{_id(generation_id)}")


def cancel_generation(generation_id: str) -> Call:
    return Call("POST", f"/v1/generations/{_id(generation_id)}/cancel", model=Generation)


def generation_image(generation_id: str, index: int) -> Call:
    return Call("GET", f"/v1/generations/{_id(generation_id)}/images/{int(index)}", raw=True)


def create_batch(generations: Iterable[Mapping[str, Any]], idempotency_key: str | None) -> Call:
    requests = []
    for item in generations:
        item = dict(item)
        if "prompt" not in item:
            raise ValueError("every generation of a batch needs a prompt")
        requests.append(generation_body(item.pop("prompt"), item))
    if not requests:
        raise ValueError("a batch needs at least one generation")
    body = {"generations": requests}
    return Call("POST", "/v1/batches", json=body, headers=_idempotency(idempotency_key), model=Batch)


def list_batches(limit: int | None, cursor: str | None) -> Call:
    return Call("GET", "/v1/batches", params={"limit": limit, "cursor": cursor}, model=Page[Batch])


def get_batch(batch_id: str) -> Call:
    return Call("GET", f"/v1/batches/{_id(batch_id)}", model=Batch)


def cancel_batch(batch_id: str) -> Call:
    return Call("POST", f"/v1/batches/{_id(batch_id)}/cancel", model=Batch)


# keys, usage, webhook secret, capabilities -------------------------------------------------------------------


def create_api_key(name: str | None) -> Call:
    body = {"name": name} if name is not None else {}
    return Call("POST", "/v1/api-keys", json=body, idempotent=False, model=ApiKey)


def list_api_keys(limit: int | None, cursor: str | None) -> Call:
    return Call("GET", "/v1/api-keys", params={"limit": limit, "cursor": cursor}, model=Page[ApiKey])


def revoke_api_key(key_id: str) -> Call:
    return Call("DELETE", f"/v1/api-keys/{_id(key_id)}")


def usage(start: str | None, end: str | None, granularity: str) -> Call:
    params = {"start": str(start) if start else None, "end": str(end) if end else None, "granularity": granularity}
    return Call("GET", "/v1/usage", params=params, model=Usage)


def rotate_webhook_secret() -> Call:
    return Call("POST", "/v1/webhook-secret/rotate", idempotent=False, model=WebhookSecret)


def capabilities() -> Call:
    return Call("GET", "/v1/capabilities", model=Capabilities)


def readiness() -> Call:
    return Call("GET", "/readyz")


# tenants (admin key) -----------------------------------------------------------------------------------------


def create_tenant(name: str, weight: float | None, limits: Mapping[str, Any] | None) -> Call:
    body: dict[str, Any] = {"name": name}
    if weight is not None:
        body["weight"] = weight
    if limits is not None:
        body["limits"] = dict(limits)
    return Call("POST", "/v1/tenants", json=body, idempotent=False, model=TenantCreated)


def list_tenants(limit: int | None, cursor: str | None) -> Call:
    return Call("GET", "/v1/tenants", params={"limit": limit, "cursor": cursor}, model=Page[Tenant])


def get_tenant(tenant_id: str) -> Call:
    return Call("GET", f"/v1/tenants/{_id(tenant_id)}", model=Tenant)


def update_tenant(tenant_id: str, weight: float | None, limits: Mapping[str, Any] | None, clear: Iterable[str]) -> Call:
    """PATCH: only what is sent changes. ``clear`` names limits (or ``weight``) to put back to the default."""
    body: dict[str, Any] = {}
    cleared = set(clear)
    if weight is not None:
        body["weight"] = weight
    elif "weight" in cleared:
        body["weight"] = None
    merged = {**{name: None for name in cleared - {"weight"}}, **dict(limits or {})}
    if merged:
        body["limits"] = merged
    if not body:
        raise ValueError("nothing to change: give weight, limits or clear")
    return Call("PATCH", f"/v1/tenants/{_id(tenant_id)}", json=body, model=Tenant)


def delete_tenant(tenant_id: str) -> Call:
    return Call("DELETE", f"/v1/tenants/{_id(tenant_id)}")

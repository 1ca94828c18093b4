"""/v1/adapters: list, inspect, download (native or LyCORIS), upload, delete, evaluate."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from shared.db import Adapter
from shared.krona.convert import lycoris_arrays, read_safetensors_bytes, safetensors_bytes
from shared.schemas import AdapterPublic, Page, adapter_public, latest_evaluations
from shared.storage import BlobNotFound

from ..deps import AdapterId, AuthenticatedRoute, ContextDep, CurrentTenant, SessionDep
from ..errors import ApiError
from ..jobs import Paging, created, get_owned, page
from ..openapi import errors
from ..services.adapters import (
    MAX_BASE_MODEL_CHARS,
    MAX_EVALUATION_PARAMS_BYTES,
    MAX_NAME_CHARS,
    delete_adapter_and_files,
    read_evaluation_form,
    read_upload_form,
    request_evaluation,
    store_upload,
)

router = APIRouter(
    route_class=AuthenticatedRoute, prefix="/v1/adapters", tags=["adapters"], responses=errors(401, 422, 503)
)


AdapterFile = Annotated[
    UploadFile,
    File(
        description="a native Krona or LyCORIS LoKr safetensors file whose factors fit the server's base model; "
        "at most 256 MiB"
    ),
]
AdapterName = Annotated[str | None, Form(max_length=MAX_NAME_CHARS)]
BaseModelName = Annotated[str | None, Form(max_length=MAX_BASE_MODEL_CHARS, description="must be the server's")]
InstancePromptField = Annotated[
    str | None,
    Form(
        max_length=1000, description="the prompt it was trained with, e.g. 'a photo of sks dog' (kept for evaluation)"
    ),
]
IdentifierField = Annotated[
    str | None,
    Form(
        max_length=100,
        description="its rare token, e.g. 'sks' (default: the word before the last of instance_prompt); evaluations "
        "use it",
    ),
]
ReferenceImages = Annotated[
    list[UploadFile],
    File(
        description="1-20 real photos of the subject that CLIP-I and DINO compare the generated images with: "
        "PNG, JPEG or WebP, the training photos' limits (deleted when the evaluation ends)",
        json_schema_extra={"minItems": 1, "maxItems": 20},
    ),
]
EvaluationParams = Annotated[
    str | None,
    Form(
        max_length=MAX_EVALUATION_PARAMS_BYTES,
        description="JSON object: prompts (1-25, default 4: the first N of DreamBooth's evaluation prompts for the "
        "class), per_prompt (1-4, default 2), steps (1-100, default 25), class_noun (default: the last word of the "
        "training's instance prompt; required for an uploaded adapter), identifier (default: the word before it)",
        examples=['{"prompts": 4, "per_prompt": 2, "class_noun": "dog"}'],
    ),
]


@router.get("", response_model=Page[AdapterPublic], summary="List adapters, newest first", responses=errors(400))
def list_adapters(
    session: SessionDep,
    tenant: CurrentTenant,
    paging: Paging,
):
    """The tenant's adapters, newest first; pass `next_cursor` as `cursor` for the next page."""
    rows, next_cursor = page(session, Adapter, tenant, paging)
    evaluations = latest_evaluations(session, [r.id for r in rows])
    return {"data": [adapter_public(r, evaluations.get(r.id)) for r in rows], "next_cursor": next_cursor}


@router.get("/{adapter_id}", response_model=AdapterPublic, summary="One adapter", responses=errors(404))
def get_adapter(adapter_id: AdapterId, session: SessionDep, tenant: CurrentTenant):
    """One adapter: its factor shapes, parameter count, size and SHA-256, and its latest evaluation."""
    row = get_owned(session, Adapter, adapter_id, tenant, "adapter")
    return adapter_public(row, latest_evaluations(session, [row.id]).get(row.id))


@router.get(
    "/{adapter_id}/file",
    summary="Download the adapter: native Krona or kohya/LyCORIS LoKr safetensors",
    responses={200: {"content": {"application/octet-stream": {}}}, **errors(404)},
    response_class=Response,
)
def download_adapter_file(
    adapter_id: AdapterId,
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    format: Literal["krona", "lycoris"] = "krona",
):
    """The adapter as safetensors: `krona` (native A/B factors) or `lycoris` (kohya/LyCORIS LoKr keys that
    ComfyUI, A1111 and Forge load; exact at scale 1)."""
    row = get_owned(session, Adapter, adapter_id, tenant, "adapter")
    try:
        data = context.storage.get_bytes(row.storage_key)
    except BlobNotFound:
        raise ApiError(404, "adapter_file_missing", f"the file of adapter {adapter_id} is missing") from None
    headers = {"Content-Disposition": f'attachment; filename="{adapter_id}.{format}.safetensors"'}
    if format == "krona":
        return Response(data, media_type="application/octet-stream", headers=headers)
    arrays, _ = read_safetensors_bytes(data, adapter_id)
    lokr, not_rebuildable = lycoris_arrays(arrays)
    meta = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": row.base_model}
    if not_rebuildable:
        headers["X-Krona-Note"] = (
            "loads in ComfyUI/A1111/Forge; the lycoris-lora Python library cannot rebuild these factor shapes"
        )
    return Response(safetensors_bytes(lokr, meta), media_type="application/octet-stream", headers=headers)


@router.post(
    "",
    status_code=201,
    response_model=AdapterPublic,
    summary="Upload an adapter",
    responses=errors(400, 413, 415),
    form_limits={"max_files": 1, "max_fields": 5, "max_part_size": 1024 * 1024},
)
async def upload_adapter(
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    file: AdapterFile,
    name: AdapterName = None,
    base_model: BaseModelName = None,
    instance_prompt: InstancePromptField = None,
    identifier: IdentifierField = None,
):
    """Upload a native or LyCORIS LoKr adapter trained elsewhere. Names and shapes are checked against the
    base model before anything is computed; the stored file is always native."""
    fields = {"name": name, "base_model": base_model, "instance_prompt": instance_prompt, "identifier": identifier}
    upload = await read_upload_form(context.settings, file=file, **fields)
    # Parsing, converting, storing and committing are blocking work: the threadpool, not the event loop.
    body = await run_in_threadpool(
        partial(
            store_upload,
            context=context,
            session=session,
            tenant=tenant,
            data=upload.data,
            label=upload.label,
            labels=upload.labels,
        )
    )
    return created(body, 201, "adapters")


@router.post(
    "/{adapter_id}/evaluations",
    status_code=202,
    response_model=AdapterPublic,
    summary="Score the adapter (CLIP-I, CLIP-T, DINO) against photos of its subject",
    responses=errors(404, 409, 413, 415),
    form_limits={"max_fields": 5, "max_part_size": 1024 * 1024},
)
async def evaluate_adapter(
    adapter_id: AdapterId,
    context: ContextDep,
    session: SessionDep,
    tenant: CurrentTenant,
    images: ReferenceImages,
    params: EvaluationParams = None,
):
    """Queue an evaluation: a worker generates the first `prompts` DreamBooth evaluation prompts for the class,
    `per_prompt` images each, and scores them: CLIP-I and DINO against these photos, CLIP-T against the prompts.
    The answer is the adapter with `evaluation.status` queued; poll `GET /v1/adapters/{id}` for the scores.
    A training with `params.evaluate` is scored against its own photos before they are deleted. 409 while an
    evaluation of this adapter runs; a new request replaces a queued one."""
    submitted = await read_evaluation_form(context.settings, images=images, raw_params=params)
    service = partial(request_evaluation, context=context, session=session, tenant=tenant, adapter_id=adapter_id)
    return await run_in_threadpool(service, submitted=submitted)


@router.delete(
    "/{adapter_id}",
    status_code=204,
    summary="Delete an adapter and its file",
    responses=errors(404),
    response_class=Response,
)
def delete_adapter(adapter_id: AdapterId, context: ContextDep, session: SessionDep, tenant: CurrentTenant):
    """Delete the adapter, its file and the reference photos of its evaluation, if any. Generations already made
    keep their images."""
    delete_adapter_and_files(context=context, session=session, tenant=tenant, adapter_id=adapter_id)
    return Response(status_code=204)

"""What the OpenAPI document says about errors: the one envelope, and every status a route can answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.schemas import EvaluationParams, TrainingParams

__all__ = ["ErrorResponse", "camel_case_operation_id", "errors"]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable", examples=["training_not_found"])
    message: str = Field(description="for people; may change", examples=["no training 'trn_…'"])
    details: Any | None = Field(None, description="more about the error: per-field problems, limits, checks")


class ErrorResponse(BaseModel):
    """Every error of the API: `{"error": {"code", "message", "details"}}`."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
_DESCRIPTIONS = {
    400: ("malformed request (cursor, multipart body, Idempotency-Key)", None),
    401: ("missing, invalid or revoked API key", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    403: ("the key's role does not allow this route (admin routes need an admin key, tenant routes a tenant's)", None),
    404: ("no such resource for this tenant (another tenant's resources answer 404 too)", None),
    409: ("conflict: Idempotency-Key reused for another request, or the state does not allow it", None),
    413: ("request, file or batch over the limit", None),
    415: ("unsupported media type (not multipart, or not PNG/JPEG/WebP)", None),
    422: ("invalid fields; `details` lists each field and what is wrong", None),
    429: (
        "rate_limited (this key's token bucket is empty), queue_full (the tenant's cap on queued jobs), or too "
        "many progress streams",
        _RETRY_AFTER,
    ),
    503: (
        "a dependency is down or busy: database_unavailable, storage_unavailable, broker_unavailable or decoder_busy",
        _RETRY_AFTER,
    ),
}


# The example each status shows (a route's description names its own codes).
_EXAMPLES = {
    400: ("invalid_cursor", "cursor is not one this API returned; list again without it"),
    401: ("unauthorized", "missing API key: send 'Authorization: Bearer <key>'"),
    403: ("admin_key_required", "this route needs an admin key (krona admin create-admin-key)"),
    404: ("not_found", "no such resource for this tenant"),
    409: ("idempotency_key_reused", "this Idempotency-Key was used for a different request"),
    413: ("payload_too_large", "request body over 209,715,200 bytes"),
    415: ("unsupported_image", "photo 2: not a PNG, JPEG or WebP image"),
    422: ("invalid_request", "prompt: String should have at least 1 character"),
    429: ("rate_limited", "this API key is over 100 requests per second (bursts of 200); retry after 1 s"),
    503: ("database_unavailable", "the database is unreachable; try again shortly"),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these statuses, each with the error envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _DESCRIPTIONS[status]
        code, message = _EXAMPLES[status]
        example = {"error": {"code": code, "message": message, "details": None}}
        out[status] = {
            "model": ErrorResponse,
            "description": description,
            "content": {"application/json": {"example": example}},
        }
        if headers:
            out[status]["headers"] = headers
    return out


def camel_case_operation_id(route) -> str:
    """`create_training` -> `createTraining`: stable ids for generated clients."""
    head, *rest = route.name.split("_")
    return head + "".join(part.capitalize() for part in rest)


_REQUEST_ID = {
    "description": "the request's id (the client's own X-Request-ID if it sent a printable one of <= 200 "
    "characters); it is in the gateway's log line for the request",
    "schema": {"type": "string"},
}
_LOCATION = {"description": "path of the created resource, e.g. /v1/trainings/trn_…", "schema": {"type": "string"}}

_REPLAYED = {
    "description": "`true` when this is the stored first answer to a repeated Idempotency-Key (nothing was created)",
    "schema": {"type": "string", "enum": ["true"]},
}

_RATE_LIMIT_HEADERS = {
    "RateLimit-Limit": {"description": "the key's bucket size (burst)", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "requests left in the bucket now", "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "seconds until the bucket is full again", "schema": {"type": "integer"}},
}

SSE_DESCRIPTION = (
    "Server-sent events. `event: progress` carries the Training (JSON) at each change of status, step or loss; "
    "one `event: done` carries it in its terminal state, and the stream ends. Comment lines (`: ping`) keep "
    "idle connections open."
)


# Binary answers: the image and the adapter file downloads.
BINARY_MEDIA = ("image/png", "application/octet-stream")


def _add_model(schema: dict[str, Any], model) -> None:
    """Put ``model``'s JSON schema (and the models it uses) under components.schemas."""
    found = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in found.pop("$defs", {}).items():
        schema["components"]["schemas"].setdefault(name, definition)
    schema["components"]["schemas"].setdefault(model.__name__, found)


def _typed_parts() -> dict[str, tuple[str, Any]]:
    return {"createTraining": ("params", TrainingParams), "evaluateAdapter": ("params", EvaluationParams)}


def _created_examples() -> dict[str, Any]:
    """What a create answers: the new resource as it is then (queued), not as it is later."""
    training = {
        "id": "trn_3f2a9c0d1e2b4a5f6c7d8e9f",
        "name": "rex",
        "status": "queued",
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "instance_prompt": "a photo of sks dog",
        "progress": {"step": 0, "total_steps": 500, "loss": None, "eta_seconds": None, "phase": "queued"},
        "queue_position": 1,
        "adapter_id": None,
        "error": None,
        "params": {"steps": 500},
        "num_images": 5,
        "created_at": "2026-11-29T10:00:00+00:00",
        "updated_at": "2026-11-29T10:00:00+00:00",
        "started_at": None,
        "finished_at": None,
        "images_deleted_at": None,
    }
    generation = {
        "id": "gen_5e6f708192a3b4c5d6e7f809",
        "status": "queued",
        "prompt": "a photo of sks dog on the moon",
        "adapter_id": "adp_0a1b2c3d4e5f60718293a4b5",
        "adapter_scale": 1.0,
        "num_images": 2,
        "steps": 25,
        "width": 512,
        "height": 512,
        "seed": 7,
        "batch_id": None,
        "phase": "queued",
        "queue_position": 1,
        "images": [],
        "error": None,
        "created_at": "2026-11-29T10:05:00+00:00",
        "updated_at": "2026-11-29T10:05:00+00:00",
        "started_at": None,
        "finished_at": None,
        "images_expired_at": None,
    }
    return {"createTraining": training, "createGeneration": generation}


TYPED_PARTS: dict[str, tuple[str, Any]] = {}
CREATED_EXAMPLES: dict[str, Any] = {}


def install_openapi(app) -> None:
    """Post-process FastAPI's document once: the event stream described in OpenAPI 3.1 terms.

    (FastAPI writes `itemSchema`, an OpenAPI 3.2 field, which 3.1 validators and client generators refuse.)
    """
    generate = app.openapi
    TYPED_PARTS.update(_typed_parts())
    CREATED_EXAMPLES.update(_created_examples())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if operation.get("security"):  # every authenticated request takes a token (shared/limits.py)
                    _add_rate_limits(operation)
                form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if form is not None:
                    _close_form(schema, operation, form)
                _fix_responses(operation)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _add_rate_limits(operation: dict[str, Any]) -> None:
    """A 429 answer and the RateLimit-* headers on the answers that carry them."""
    description, headers = _DESCRIPTIONS[429]
    example = {"error": {"code": _EXAMPLES[429][0], "message": _EXAMPLES[429][1]}}
    operation["responses"].setdefault(
        "429",
        {
            "description": description,
            "headers": dict(headers or {}),
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}, "example": example}
            },
        },
    )
    for status, response in operation["responses"].items():
        if status < "400" or status == "429":
            response.setdefault("headers", {}).update(_RATE_LIMIT_HEADERS)


def _close_form(schema: dict[str, Any], operation: dict[str, Any], form: dict[str, Any]) -> None:
    """A form route takes no fields but its own (and caps how many); its JSON part has its model's schema, so
    that generated clients type it; its files are `format: binary`."""
    name = form["schema"].get("$ref", "").rsplit("/", 1)[-1]
    body = schema["components"]["schemas"].get(name, form["schema"])
    body["additionalProperties"] = False
    typed = TYPED_PARTS.get(operation.get("operationId", ""))
    if typed is not None:
        part, model = typed
        _add_model(schema, model)
        description = body["properties"][part].get("description")
        body["properties"][part] = {"$ref": f"#/components/schemas/{model.__name__}"}
        if description:
            body["properties"][part] = {"allOf": [body["properties"][part]], "description": description}
        form["encoding"] = {part: {"contentType": "application/json"}}
    for field in body.get("properties", {}).values():
        # Files as generators know them: OpenAPI 3.0's `format: binary` next to 3.1's
        # contentMediaType (openapi-python-client reads only the former).
        for part in (field, field.get("items", {})):
            if "contentMediaType" in part:
                part["format"] = "binary"


def _fix_responses(operation: dict[str, Any]) -> None:
    """Every answer's headers, JSON errors on every route, binary files, create examples and the event stream."""
    operation_id = operation.get("operationId", "")
    responses = operation.get("responses", {})
    for status, response in responses.items():
        response.setdefault("headers", {})["X-Request-ID"] = _REQUEST_ID
        if status in ("201", "202") and operation_id.startswith(("create", "upload")):
            response["headers"]["Location"] = _LOCATION
            response["headers"]["Idempotent-Replayed"] = _REPLAYED
        media = response.get("content", {})
        if status >= "400" and media and "schema" not in media.get("application/json", {}):
            # Errors are JSON even on a route whose success is a stream or a file.
            other = next(spec for name, spec in media.items() if name != "application/json")
            response["content"] = {"application/json": {**other, **media.get("application/json", {})}}
    content = responses.get("200", {}).get("content", {})
    for media, spec in content.items():
        if media in BINARY_MEDIA:  # a file, as generators know one
            spec["schema"] = {"type": "string", "format": "binary"}
    example = CREATED_EXAMPLES.get(operation_id)
    if example is not None:
        for status in ("201", "202"):
            created = responses.get(status, {}).get("content", {}).get("application/json")
            if created is not None:
                created["example"] = example
    if "text/event-stream" in content:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": SSE_DESCRIPTION},
            "example": 'event: progress\ndata: {"id": "trn_…", "status": "running", …}\n\n',
        }

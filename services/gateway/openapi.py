"""What the OpenAPI document says about errors: the one envelope, and every status a route can answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

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


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these statuses, each with the error envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _DESCRIPTIONS[status]
        out[status] = {"model": ErrorResponse, "description": description}
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


def install_openapi(app) -> None:
    """Post-process FastAPI's document once: the event stream described in OpenAPI 3.1 terms.

    (FastAPI writes `itemSchema`, an OpenAPI 3.2 field, which 3.1 validators and client generators refuse.)
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if operation.get("security"):  # every authenticated request takes a token (shared/limits.py)
                    description, headers = _DESCRIPTIONS[429]
                    operation["responses"].setdefault(
                        "429",
                        {
                            "description": description,
                            "headers": dict(headers or {}),
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                        },
                    )
                    for status, response in operation["responses"].items():
                        if status < "400" or status == "429":
                            response.setdefault("headers", {}).update(_RATE_LIMIT_HEADERS)
                form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if form is not None:  # the form routes take no fields but their own (and cap how many)
                    name = form["schema"].get("$ref", "").rsplit("/", 1)[-1]
                    body = schema["components"]["schemas"].get(name, form["schema"])
                    body["additionalProperties"] = False
                    for field in body.get("properties", {}).values():
                        # Files as generators know them: OpenAPI 3.0's `format: binary` next to 3.1's
                        # contentMediaType (openapi-python-client reads only the former).
                        for part in (field, field.get("items", {})):
                            if "contentMediaType" in part:
                                part["format"] = "binary"
                for status, response in operation.get("responses", {}).items():
                    response.setdefault("headers", {})["X-Request-ID"] = _REQUEST_ID
                    if status in ("201", "202") and operation.get("operationId", "").startswith(("create", "upload")):
                        response["headers"]["Location"] = _LOCATION
                    media = response.get("content", {})
                    if status >= "400" and media and "application/json" not in media:
                        # Errors are JSON even on a route whose success is a stream or a file.
                        response["content"] = {"application/json": next(iter(media.values()))}
                content = operation.get("responses", {}).get("200", {}).get("content", {})
                stream = content.get("text/event-stream")
                if stream is not None:
                    content["text/event-stream"] = {
                        "schema": {"type": "string", "description": SSE_DESCRIPTION},
                        "example": 'event: progress\ndata: {"id": "trn_…", "status": "running", …}\n\n',
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

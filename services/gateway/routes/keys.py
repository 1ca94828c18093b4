"""/v1/api-keys: a tenant's own API keys: create (the key shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from shared.db import ApiKey
from shared.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, Page, api_key_public

from ..deps import AuthenticatedRoute, ContextDep, CurrentTenant, SessionDep, _resource_id
from ..jobs import Paging, created, page
from ..openapi import ErrorResponse, errors
from ..services import tenants

# An admin key has no tenant, so it has no keys of its own here.
TENANT_KEY_ONLY = {
    403: {"model": ErrorResponse, "description": "an admin key: these routes take a tenant's key (tenant_key_required)"}
}

router = APIRouter(
    route_class=AuthenticatedRoute,
    prefix="/v1/api-keys",
    tags=["api-keys"],
    responses={**errors(401, 422, 503), **TENANT_KEY_ONLY},
)

ApiKeyId = _resource_id("key", "API key")


@router.post("", status_code=201, response_model=ApiKeyCreated, summary="Create an API key", responses=errors(400, 409))
def create_api_key(context: ContextDep, session: SessionDep, tenant: CurrentTenant, body: ApiKeyCreate | None = None):
    """A new key for this tenant. The key itself is in this answer only: the server keeps its SHA-256.
    Creating a key, then revoking the old one, rotates a key without downtime. 409 `api_key_limit` when the
    tenant has its maximum of active keys (`max_api_keys`)."""
    name = body.name if body else None
    key = tenants.create_key(session=session, settings=context.settings, tenant=tenant, name=name)
    return created(key, 201, "api-keys")


@router.get("", response_model=Page[ApiKeyPublic], summary="List API keys, newest first", responses=errors(400))
def list_api_keys(
    session: SessionDep,
    tenant: CurrentTenant,
    paging: Paging,
):
    """This tenant's keys, revoked ones included, newest first: their prefix, name and times, never the key.
    Pass `next_cursor` as `cursor` for the next page."""
    rows, next_cursor = page(session, ApiKey, tenant, paging)
    return {"data": [api_key_public(r) for r in rows], "next_cursor": next_cursor}


@router.delete(
    "/{key_id}", status_code=204, summary="Revoke an API key", responses=errors(404, 409), response_class=Response
)
def revoke_api_key(
    key_id: ApiKeyId,
    session: SessionDep,
    tenant: CurrentTenant,
    force: Annotated[bool, Query(description="revoke it even if it is the tenant's last active key")] = False,
):
    """Revoke the key: the next request that sends it answers 401. Revoking a revoked key answers 204 again.
    A tenant may revoke the key it calls with, but not its last active key (409 `last_api_key`: it would lock
    itself out; create another key first, or pass `force=true`)."""
    tenants.revoke_key(session=session, tenant=tenant, key_id=key_id, force=force)
    return Response(status_code=204)

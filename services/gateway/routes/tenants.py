"""/v1/tenants: tenants, for an admin key only: create (key and webhook secret shown once), list, inspect,
change weight and limits, delete with everything of theirs."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from shared.schemas import Page, TenantCreate, TenantCreated, TenantPublic, TenantUpdate, tenant_public

from ..deps import AuthenticatedRoute, ContextDep, CurrentAdmin, SessionDep, _resource_id
from ..jobs import Paging
from ..openapi import ErrorResponse, errors
from ..services import tenants

ADMIN_ONLY = {
    403: {"model": ErrorResponse, "description": "not an admin key (admin_key_required): krona admin create-admin-key"}
}

router = APIRouter(
    route_class=AuthenticatedRoute,
    prefix="/v1/tenants",
    tags=["tenants"],
    responses={**errors(401, 422, 503), **ADMIN_ONLY},
)

TenantId = _resource_id("ten", "tenant")


@router.post("", status_code=201, response_model=TenantCreated, summary="Create a tenant", responses=errors(400, 409))
def create_tenant(body: TenantCreate, context: ContextDep, session: SessionDep, admin: CurrentAdmin):
    """A new tenant with its first API key and its webhook signing secret, both shown in this answer only.
    409 tenant_exists when the name is taken."""
    created = tenants.create_tenant(session=session, settings=context.settings, spec=body)
    return JSONResponse(created, status_code=201, headers={"Location": f"/v1/tenants/{created['tenant']['id']}"})


@router.get("", response_model=Page[TenantPublic], summary="List tenants, newest first", responses=errors(400))
def list_tenants(
    context: ContextDep,
    session: SessionDep,
    admin: CurrentAdmin,
    paging: Paging,
):
    """Every tenant with its weight, its limit overrides and the limits in effect; pass `next_cursor` as `cursor`
    for the next page."""
    rows, next_cursor = tenants.list_tenants(session=session, paging=paging)
    return {"data": [tenant_public(r, context.settings) for r in rows], "next_cursor": next_cursor}


@router.get("/{tenant_id}", response_model=TenantPublic, summary="One tenant", responses=errors(404))
def get_tenant(tenant_id: TenantId, context: ContextDep, session: SessionDep, admin: CurrentAdmin):
    """The tenant's weight, limit overrides and the limits in effect (overrides, else the server's settings)."""
    return tenant_public(tenants.get_tenant(session=session, tenant_id=tenant_id), context.settings)


@router.patch(
    "/{tenant_id}",
    response_model=TenantPublic,
    summary="Change a tenant's weight or limits",
    responses=errors(400, 404),
)
def update_tenant(
    tenant_id: TenantId, body: TenantUpdate, context: ContextDep, session: SessionDep, admin: CurrentAdmin
):
    """Only the fields sent change. A limit set to null goes back to the server's default (`limits: null`: all of
    them); `weight: null` is back to 1. Rate limits apply from the tenant's next request."""
    tenant = tenants.get_tenant(session=session, tenant_id=tenant_id)
    return tenants.update_tenant(session=session, settings=context.settings, tenant=tenant, spec=body)


@router.delete(
    "/{tenant_id}",
    status_code=204,
    summary="Delete a tenant and everything of it",
    responses=errors(404),
    response_class=Response,
)
def delete_tenant(tenant_id: TenantId, context: ContextDep, session: SessionDep, admin: CurrentAdmin):
    """Delete the tenant, all its rows (trainings, generations, batches, adapters, API keys, usage records) and
    then its files. Its keys stop working at once. This cannot be undone."""
    tenants.delete_tenant(session=session, storage=context.storage, tenant_id=tenant_id)
    return Response(status_code=204)

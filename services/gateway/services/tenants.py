"""API keys (a tenant's own) and tenants (an admin's): create, list, change, revoke, delete.

The CLI (`krona admin …`) calls the same functions, so the API and the command line cannot drift apart.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import ApiKey, Tenant, is_id, utcnow
from shared.errors import Conflict, Invalid, NotFound
from shared.limits import LimitOverrides, tenant_limits
from shared.schemas import TenantCreate, TenantUpdate, api_key_public, tenant_public
from shared.settings import Settings
from shared.storage import Storage
from shared.storage import keys as blob_keys
from shared.tenants import create_tenant as create_tenant_row
from shared.tenants import new_api_key
from shared.tenants import rotate_webhook_secret as rotate_secret

from ..jobs import PageRequest, page_of

__all__ = [
    "apply_limits",
    "create_key",
    "create_tenant",
    "delete_tenant",
    "find_tenant",
    "get_tenant",
    "list_tenants",
    "revoke_key",
    "update_tenant",
]

log = logging.getLogger("krona.gateway")

DEFAULT_WEIGHT = 1.0


# A tenant's own keys ------------------------------------------------------------------------------------


def create_key(*, session: Session, settings: Settings, tenant: Tenant, name: str | None) -> dict[str, Any]:
    """A new key for ``tenant``, committed; its public body with the key itself (shown this once). 409
    ``api_key_limit`` when the tenant has its maximum of active keys (the tenant's row is locked meanwhile, so
    concurrent creates cannot pass the cap together): each key has its own rate-limit bucket, so the cap also
    bounds a tenant's total request rate to keys x rate."""
    cap = tenant_limits(settings, tenant.limits).max_api_keys
    session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
    )
    if active >= cap:
        session.rollback()
        raise Conflict(
            "api_key_limit",
            f"this tenant has {active} active API keys, the most it may have ({cap}); revoke one first "
            "(DELETE /v1/api-keys/{id})",
            {"active": active, "limit": cap},
        )
    key, row = new_api_key(session, tenant, name=name)
    session.commit()
    return api_key_public(row, key)


def revoke_key(*, session: Session, tenant: Tenant | None, key_id: str, force: bool = True) -> bool:
    """Revoke the key (of ``tenant``; any tenant's or an admin key with None); 404 if it is not there.

    Idempotent: a revoked key stays revoked at its first time. Returns whether this call revoked it. The next
    request with the key is refused: authentication reads the key's row on every request.
    """
    row = session.get(ApiKey, key_id) if is_id(key_id, "key") else None
    if row is None or (tenant is not None and row.tenant_id != tenant.id):
        raise NotFound("api_key_not_found", f"no API key {key_id!r}")
    if not force and row.revoked_at is None and row.tenant_id is not None:
        # The tenant's row is locked so that two revokes cannot each leave the other key as the last one.
        session.execute(select(Tenant.id).where(Tenant.id == row.tenant_id).with_for_update())
        others = session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(ApiKey.tenant_id == row.tenant_id, ApiKey.revoked_at.is_(None), ApiKey.id != key_id)
        )
        if not others:
            session.rollback()
            raise Conflict(
                "last_api_key",
                "this is the tenant's last active API key: revoking it would lock the tenant out; create another "
                "key first (POST /v1/api-keys), or pass force=true",
            )
    revoked = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return bool(revoked)


# Tenants (admin) ----------------------------------------------------------------------------------------


def rotate_webhook_secret(*, session: Session, tenant: Tenant) -> str:
    """A new signing secret for the tenant's webhooks, committed; the old one stops verifying at once."""
    secret = rotate_secret(session, tenant)
    session.commit()
    return secret


def get_tenant(*, session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id) if is_id(tenant_id, "ten") else None
    if tenant is None:
        raise NotFound("tenant_not_found", f"no tenant {tenant_id!r}")
    return tenant


def find_tenant(session: Session, name_or_id: str) -> Tenant:
    """The tenant with this id or name (the CLI's TENANT argument); ValueError if there is none."""
    if "\x00" in name_or_id:
        raise ValueError(f"no tenant {name_or_id!r}")
    by_id = session.get(Tenant, name_or_id) if is_id(name_or_id, "ten") else None
    tenant = by_id or session.scalar(select(Tenant).where(Tenant.name == name_or_id))
    if tenant is None:
        raise ValueError(f"no tenant {name_or_id!r} (give its name or its ten_… id; krona admin list-tenants)")
    return tenant


def list_tenants(*, session: Session, paging: PageRequest) -> tuple[list[Tenant], str | None]:
    """Every tenant, newest first, a page at a time (the cursor of services/gateway/jobs.py)."""
    return page_of(session, Tenant, select(Tenant), paging.limit, paging.cursor)


def create_tenant(*, session: Session, settings: Settings, spec: TenantCreate) -> dict[str, Any]:
    """A new tenant with its first key, committed: {tenant, api_key, webhook_secret} (key and secret shown once).

    409 tenant_exists for a taken name (also when a concurrent create takes it first)."""
    taken = Conflict("tenant_exists", f"a tenant named {spec.name!r} already exists")
    if session.scalar(select(Tenant.id).where(Tenant.name == spec.name)) is not None:
        raise taken
    try:
        tenant, key = create_tenant_row(session, spec.name)
    except ValueError as exc:  # the name: the body's pattern already checks it
        raise Invalid("invalid_request", str(exc)) from None
    tenant.weight = spec.weight
    if spec.limits is not None:
        apply_limits(tenant, spec.limits.model_dump(exclude_none=True))
    secret = tenant.webhook_secret
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise taken from None
    return {"tenant": tenant_public(tenant, settings), "api_key": key, "webhook_secret": secret}


def apply_limits(tenant: Tenant, changes: dict[str, Any]) -> None:
    """Merge ``changes`` into the tenant's overrides: a value sets one, None removes it (back to the default)."""
    merged = dict(tenant.limits or {})
    for name, value in changes.items():
        if name not in LimitOverrides.model_fields:
            raise ValueError(f"no limit {name!r}; limits are {', '.join(LimitOverrides.model_fields)}")
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    tenant.limits = LimitOverrides(**merged).model_dump(exclude_none=True)  # a new dict: the JSON column sees it


def update_tenant(*, session: Session, settings: Settings, tenant: Tenant, spec: TenantUpdate) -> dict[str, Any]:
    """Change what the PATCH body sends (see TenantUpdate), committed; the tenant's public body."""
    if "weight" in spec.model_fields_set:
        tenant.weight = spec.weight if spec.weight is not None else DEFAULT_WEIGHT
    if "limits" in spec.model_fields_set:
        if spec.limits is None:
            tenant.limits = {}
        else:
            apply_limits(tenant, {name: getattr(spec.limits, name) for name in spec.limits.model_fields_set})
    session.commit()
    return tenant_public(tenant, settings)


def delete_tenant(*, session: Session, storage: Storage, tenant_id: str) -> int | None:
    """Delete the tenant, every row of it (the foreign keys cascade: jobs, batches, adapters, keys, idempotency
    records, fair-share counters, usage) and then its blobs (``tenants/<id>/``). 404 if there is no such tenant.

    The blobs go after the rows' commit, so no row is left pointing at a deleted blob. A storage failure then is
    logged, not raised: the rows are gone and the storage sweep removes what is left. Returns the number of blobs
    deleted, or None when storage failed.
    """
    if session.execute(delete(Tenant).where(Tenant.id == tenant_id)).rowcount == 0:
        session.rollback()
        raise NotFound("tenant_not_found", f"no tenant {tenant_id!r}")
    session.commit()
    try:
        return storage.delete_prefix(blob_keys.tenant_folder(tenant_id))
    except Exception as exc:
        log.warning(
            "tenant %s deleted; its blobs could not be removed (%s: %s); the storage sweep will",
            tenant_id,
            exc.__class__.__name__,
            exc,
        )
        return None

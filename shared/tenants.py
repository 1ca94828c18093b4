"""Tenants and API keys: keys are 256-bit random strings, stored only as SHA-256 and looked up by that hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from shared.db import ApiKey, KeyRole, Tenant, new_id, utcnow
from shared.webhooks import new_webhook_secret

__all__ = [
    "KEY_PREFIX",
    "create_api_key",
    "create_tenant",
    "hash_key",
    "key_is_active",
    "new_api_key",
    "principal_for_key",
    "rotate_webhook_secret",
    "tenant_for_key",
]

KEY_PREFIX = "krona_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, tenant: Tenant | None, *, name: str | None = None, role: str = "tenant") -> str:
    """Add a new key for ``tenant`` (None with ``role="admin"``); returns the key itself (shown once, never stored)."""
    return new_api_key(session, tenant, name=name, role=role)[0]


def new_api_key(
    session: Session, tenant: Tenant | None, *, name: str | None = None, role: str = "tenant"
) -> tuple[str, ApiKey]:
    """(the key, its row) for a new key, added to the session."""
    if role not in ("tenant", "admin") or (role == KeyRole.ADMIN) != (tenant is None):
        raise ValueError("an admin key has no tenant; a tenant key needs one")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id if tenant else None,
        role=role,
        name=name,
        key_hash=hash_key(key),
        prefix=key[: len(KEY_PREFIX) + 6],
        created_at=utcnow(),
    )
    session.add(row)
    return key, row


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant and its first API key; ValueError if the name is taken or malformed.

    The tenant's webhook signing secret is ``tenant.webhook_secret``: show it once, with the key.
    """
    name = name.strip()
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError("tenant names are 1-100 letters, digits, '-', '_' or '.'")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise ValueError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, webhook_secret=new_webhook_secret())
    session.add(tenant)
    session.flush()
    return tenant, create_api_key(session, tenant)


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant owning an unrevoked tenant ``key``, or None."""
    found = principal_for_key(session, key)
    return found[1] if found is not None else None


# Built once: this runs on every authenticated request.
_PRINCIPAL = (
    select(ApiKey, Tenant)
    .outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


def principal_for_key(session: Session, key: str) -> tuple[ApiKey, Tenant | None] | None:
    """(key row, its tenant) for an unrevoked ``key`` (the tenant is None for an admin key), or None: one query,
    by the key's hash (keys are never stored)."""
    row = session.execute(_PRINCIPAL, {"key_hash": hash_key(key)}).first()
    if row is None:
        return None
    api_key, tenant = row
    if api_key.role != KeyRole.ADMIN and tenant is None:
        return None
    return api_key, tenant


def key_is_active(session: Session, key_id: str) -> bool:
    """Whether the key exists (deleting a tenant deletes its keys) and is not revoked."""
    return session.scalar(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))) is not None


def rotate_webhook_secret(session: Session, tenant: Tenant) -> str:
    """Give ``tenant`` a new webhook signing secret (deliveries from now on use it); returns it, to show once."""
    tenant.webhook_secret = new_webhook_secret()
    session.add(tenant)
    return tenant.webhook_secret

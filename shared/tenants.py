"""Tenants and API keys: keys are 256-bit random strings, stored only as SHA-256 and looked up by that hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import ApiKey, Tenant
from shared.webhooks import new_webhook_secret

__all__ = ["KEY_PREFIX", "create_api_key", "create_tenant", "hash_key", "rotate_webhook_secret", "tenant_for_key"]

KEY_PREFIX = "krona_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, tenant: Tenant) -> str:
    """Add a new key for ``tenant``; returns the key itself (shown once, never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6]))
    return key


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
    """The tenant owning an unrevoked ``key``, or None: one query, by the key's hash (keys are never stored)."""
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


def rotate_webhook_secret(session: Session, tenant: Tenant) -> str:
    """Give ``tenant`` a new webhook signing secret (deliveries from now on use it); returns it, to show once."""
    tenant.webhook_secret = new_webhook_secret()
    session.add(tenant)
    return tenant.webhook_secret

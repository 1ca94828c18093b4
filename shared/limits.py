"""Per-tenant limits: the settings' defaults, overridden by what is stored on the tenant's row; and the
request-rate token bucket of an API key, kept on the key's row so that every gateway replica shares it.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per second; a request takes one.
The check is one guarded UPDATE (refill, take, stamp ``last_used_at``) that succeeds only while a token is
left, so concurrent requests through any number of replicas cannot take more than the bucket holds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.orm import Session

from shared.db import ApiKey, utcnow

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["LimitOverrides", "RateDecision", "TenantLimits", "take_token", "tenant_limits"]


class LimitOverrides(BaseModel):
    """What an admin may set per tenant (``PATCH /v1/tenants/{id}``); an unset field takes the server's default."""

    model_config = ConfigDict(extra="forbid")

    rate_limit_per_second: float | None = Field(None, ge=0, le=100_000, description="0 = no limit")
    rate_limit_burst: int | None = Field(None, ge=1, le=1_000_000)
    max_queued_jobs: int | None = Field(None, ge=0, le=10_000_000, description="0 = no cap")
    max_running_jobs: int | None = Field(None, ge=0, le=100_000, description="per queue; 0 = no cap")
    max_generation_compute: int | None = Field(None, ge=1, le=10**15)
    max_training_compute: int | None = Field(None, ge=1, le=10**15)
    max_class_images: int | None = Field(None, ge=0, le=10_000)
    max_gradient_accumulation: int | None = Field(None, ge=1, le=1024)
    max_train_resolution: int | None = Field(None, ge=64, le=4096)
    max_api_keys: int | None = Field(None, ge=1, le=10_000)
    max_adapters: int | None = Field(None, ge=1, le=1_000_000)


@dataclass(frozen=True)
class TenantLimits:
    rate_limit_per_second: float
    rate_limit_burst: int
    max_queued_jobs: int
    max_running_jobs: int
    max_generation_compute: int
    max_training_compute: int
    max_class_images: int
    max_gradient_accumulation: int
    max_train_resolution: int
    max_api_keys: int
    max_adapters: int


def tenant_limits(settings: Settings, overrides: dict[str, Any] | None) -> TenantLimits:
    """The limits that apply to a tenant: each stored override, else the setting of the same name."""
    stored = {k: v for k, v in (overrides or {}).items() if v is not None and k in TenantLimits.__dataclass_fields__}
    return TenantLimits(
        **{name: stored.get(name, getattr(settings, name)) for name in TenantLimits.__dataclass_fields__}
    )


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int  # the bucket size
    remaining: int  # whole tokens left after this request
    reset_seconds: int  # until the bucket is full again
    retry_after_seconds: int  # until the next token (0 when allowed)

    def headers(self) -> dict[str, str]:
        """The RateLimit-* fields (IETF draft-ietf-httpapi-ratelimit-headers), plus Retry-After on a refusal."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.retry_after_seconds))
        return headers


# The bucket's statements are built once, with bound parameters: building and caching the ORM form of these
# CASE expressions on every request cost three times as much CPU as running them.
_KEYS = cast(Table, ApiKey.__table__)  # declarative classes type __table__ as FromClause; it is their Table
_TOKENS = case((_KEYS.c.rate_tokens.is_(None), bindparam("burst")), else_=_KEYS.c.rate_tokens)
_ELAPSED = case(
    (_KEYS.c.rate_checked.is_(None), 0.0),
    (_KEYS.c.rate_checked > bindparam("now"), 0.0),
    else_=bindparam("now") - _KEYS.c.rate_checked,
)
_REFILLED = _TOKENS + _ELAPSED * bindparam("rate")
_LEVEL = case((bindparam("burst") < _REFILLED, bindparam("burst")), else_=_REFILLED)
# Refill, take one token and stamp the key's last use, only while a token is left (one guarded UPDATE).
_TAKE = (
    update(_KEYS)
    .where(_KEYS.c.id == bindparam("key_id"), _LEVEL >= 1.0)
    .values(rate_tokens=_LEVEL - 1.0, rate_checked=bindparam("now"), last_used_at=bindparam("stamp"))
    .returning(_KEYS.c.rate_tokens)
)
_LEVEL_NOW = select(_LEVEL).where(_KEYS.c.id == bindparam("key_id"))
# No bucket: keep ``last_used_at`` to the minute without a write per request.
_STAMP = (
    update(_KEYS)
    .where(
        _KEYS.c.id == bindparam("key_id"),
        (_KEYS.c.last_used_at.is_(None)) | (_KEYS.c.last_used_at < bindparam("minute_ago")),
    )
    .values(last_used_at=bindparam("stamp"))
)


def take_token(session: Session, key_id: str, rate: float, burst: int, now: float | None = None) -> RateDecision | None:
    """Take one token from the key's bucket and stamp its last use; commits. None when the rate is unlimited.

    Give it an autocommit session where it can (the gateway does): the UPDATE then holds the key's row lock only
    for the statement itself, not until a COMMIT sent after this thread gets the GIL back."""
    now = time.time() if now is None else now
    stamp = utcnow()
    connection = session.connection()
    if rate <= 0:
        connection.execute(_STAMP, {"key_id": key_id, "stamp": stamp, "minute_ago": stamp - timedelta(seconds=60)})
        session.commit()
        return None
    values = {"key_id": key_id, "now": now, "rate": float(rate), "burst": float(burst)}
    taken = connection.execute(_TAKE, values | {"stamp": stamp}).scalar()
    session.commit()
    if taken is not None:
        left = max(0.0, float(taken))
        return RateDecision(True, burst, int(left), math.ceil((burst - left) / rate), 0)
    # Refused: read the level to say when the next token comes.
    current = session.connection().execute(_LEVEL_NOW, values).scalar() or 0.0
    session.commit()
    current = max(0.0, float(current))
    return RateDecision(False, burst, 0, math.ceil((burst - current) / rate), math.ceil((1.0 - current) / rate))

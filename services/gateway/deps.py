"""Typed dependencies: the session, the caller (Bearer key: a tenant's or an admin's), the app context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from anyio.lowlevel import RunVar
from fastapi import Depends, Header, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared.db import KeyRole, Tenant
from shared.limits import RateDecision, take_token, tenant_limits
from shared.tenants import principal_for_key

from .context import AppContext
from .errors import ApiError


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in the threadpool, and
# each such hop costs more CPU than the dependency itself (about a tenth of a create's CPU for three of them).
async def get_context(request: Request) -> AppContext:
    return request.app.state.context


ContextDep = Annotated[AppContext, Depends(get_context)]


async def get_session(context: ContextDep) -> AsyncIterator[Session]:
    """The handler's session. It takes a connection only at its first query (in the handler's thread) and
    gives it back at each commit and at the end.

    Opening a session does no I/O, and neither does closing one that holds no connection (the handler
    committed, or never queried), so both happen here on the event loop; a session left inside a transaction
    (the handler raised, or answered from what it read) is rolled back in a thread, because that is a round trip
    to the database. That thread is not one of the request threadpool's: when every request thread waits for a
    pooled connection, the connections to give back are those of sessions waiting here, and a rollback queued
    behind those threads would never run (seen: 200 concurrent creates with one Idempotency-Key, 503 after the
    pool's timeout)."""
    session = context.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await anyio.to_thread.run_sync(_rollback_and_close, session, limiter=_release_limiter())
        else:
            session.close()


def _release_limiter() -> anyio.CapacityLimiter:
    """The event loop's own limiter for giving connections back (a RunVar, like anyio's default limiter)."""
    try:
        return _RELEASE.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(64)
        _RELEASE.set(limiter)
        return limiter


_RELEASE: RunVar[anyio.CapacityLimiter] = RunVar("krona_release_limiter")


def _rollback_and_close(session: Session) -> None:
    session.rollback()
    session.close()


SessionDep = Annotated[Session, Depends(get_session)]


# The OpenAPI document gets a bearer security scheme from this (the Authorize button of /docs).
bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description="`Authorization: Bearer krona_…`")


@dataclass
class Principal:
    """Who sent the request: the key, its role, its tenant (None for an admin key) and its rate decision."""

    key_id: str
    role: str
    tenant: Tenant | None
    rate: RateDecision | None = None


def authenticate(context: AppContext, key: str | None, *, charge: bool = True) -> Principal:
    """The key's principal, read in a short session of its own (detached), so that no connection is held
    between authentication and the handler, or for the life of a stream; 401 otherwise. With ``charge``,
    the request takes a token from the key's bucket (429 rate_limited with Retry-After when it is empty).
    A revoked key is refused at its next request: nothing is cached."""
    if not key:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    with context.autocommit_session() as session:
        found = principal_for_key(session, key.strip())
        if found is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key")
        api_key, tenant = found
        principal = Principal(api_key.id, api_key.role, tenant)
        if tenant is not None:
            session.expunge(tenant)
        if charge:
            limits = tenant_limits(context.settings, tenant.limits if tenant is not None else None)
            principal.rate = take_token(session, api_key.id, limits.rate_limit_per_second, limits.rate_limit_burst)
    if principal.rate is not None and not principal.rate.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"this API key is over {limits.rate_limit_per_second:g} requests per second "
            f"(bursts of {limits.rate_limit_burst}); retry after {principal.rate.retry_after_seconds} s",
            {"limit_per_second": limits.rate_limit_per_second, "burst": limits.rate_limit_burst},
            headers=principal.rate.headers(),
        )
    return principal


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


class AuthenticatedRoute(APIRoute):
    """The route class of every /v1 router: the caller's key is checked, and its rate-limit token taken, before
    FastAPI reads the request's body. (FastAPI reads and parses a body, a multipart upload included, before it
    solves any dependency; without this an unauthenticated client could make the gateway receive and spool up to
    KRONA_MAX_REQUEST_BYTES before its 401.) Errors raised here are answered by the app's handlers as usual."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authenticated(request: Request) -> Response:
            principal = await run_in_threadpool(authenticate, request.app.state.context, _bearer_key(request))
            request.state.principal = principal
            request.state.rate_limit = principal.rate  # RequestContext adds the RateLimit-* headers to the answer
            return await handler(request)

        return authenticated


async def current_principal(
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The principal AuthenticatedRoute found (``bearer`` only documents the scheme in OpenAPI); a route of another
    class authenticates here."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        key = credentials.credentials if credentials else None
        principal = await run_in_threadpool(authenticate, context, key)
        request.state.principal = principal
        request.state.rate_limit = principal.rate
    return principal


async def current_tenant(principal: Annotated[Principal, Depends(current_principal)]) -> Tenant:
    if principal.tenant is None:
        raise ApiError(403, "tenant_key_required", "an admin key manages tenants; use a tenant's key for this route")
    return principal.tenant


async def current_admin(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if principal.role != KeyRole.ADMIN:
        raise ApiError(403, "admin_key_required", "this route needs an admin key (krona admin create-admin-key)")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
CurrentAdmin = Annotated[Principal, Depends(current_admin)]


def _resource_id(prefix: str, what: str):
    """A documented id path parameter: `trn_` + 24 hex digits. The pattern is stated, not enforced, so that an
    unknown or malformed id answers 404 like any id that is not this tenant's."""
    example = f"{prefix}_3f2a9c0d1e2b4a5f6c7d8e9f"
    return Annotated[
        str,
        Path(
            description=f"the {what}'s id",
            examples=[example],
            json_schema_extra={"pattern": f"^{prefix}_[0-9a-f]{{24}}$"},
        ),
    ]


TrainingId = _resource_id("trn", "training")
AdapterId = _resource_id("adp", "adapter")
GenerationId = _resource_id("gen", "generation")
BatchId = _resource_id("bat", "batch")


# Documented here once for every creating route; the server checks it (400 over 200 characters, 409 when reused
# for another request) in jobs.replay.
IdempotencyKey = Annotated[
    str | None,
    Header(
        description="the same key from the same tenant returns the first answer for 24 h and creates nothing new; "
        "reusing it for a different request answers 409",
        json_schema_extra={"maxLength": 200},
        examples=["order-7431-training"],
    ),
]

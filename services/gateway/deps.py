"""Typed dependencies: the session, the current tenant (Bearer key), the app context."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared.db import Tenant
from shared.tenants import tenant_for_key

from .context import AppContext
from .errors import ApiError


def get_context(request: Request) -> AppContext:
    return request.app.state.context


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """The handler's session. It takes a connection only at its first query (in the handler's thread) and
    gives it back at each commit and at the end."""
    session = context.sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


# The OpenAPI document gets a bearer security scheme from this (the Authorize button of /docs).
bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description="`Authorization: Bearer krona_…`")


def authenticate(context: AppContext, key: str | None) -> Tenant:
    """The key's tenant, read in a short session of its own (detached), so that no connection is held
    between authentication and the handler, or for the life of a stream; 401 otherwise."""
    if not key:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    with context.sessions() as session:
        tenant = tenant_for_key(session, key.strip())
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key")
        session.expunge(tenant)
    return tenant


def current_tenant(
    context: ContextDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Tenant:
    return authenticate(context, credentials.credentials if credentials else None)


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]


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

"""Typed dependencies: the session, the current tenant (Bearer key), the app context."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
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


def current_tenant(context: ContextDep, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    """The key's tenant, read in a short session of its own (detached), so that no connection is held
    between authentication and the handler, or for the life of a stream."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    with context.sessions() as session:
        tenant = tenant_for_key(session, authorization[7:].strip())
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key")
        session.expunge(tenant)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]

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
    session = context.sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def current_tenant(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    tenant = tenant_for_key(session, authorization[7:].strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]

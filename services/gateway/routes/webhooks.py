"""/v1/webhook-secret: the tenant's webhook signing secret, rotated (and shown once) on request."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from shared.webhooks import SIGNATURE_HEADER

from ..deps import AuthenticatedRoute, CurrentTenant, SessionDep
from ..openapi import errors
from ..services import tenants

router = APIRouter(
    route_class=AuthenticatedRoute, prefix="/v1/webhook-secret", tags=["webhooks"], responses=errors(401, 422, 503)
)


class WebhookSecret(BaseModel):
    webhook_secret: str = Field(description="HMAC-SHA256 key of this tenant's deliveries; shown only in this answer")
    signature_header: str = Field(SIGNATURE_HEADER, description="the header that carries t=<unix time>,v1=<hex>")


@router.post("/rotate", response_model=WebhookSecret, summary="Replace this tenant's webhook signing secret")
def rotate_webhook_secret(session: SessionDep, tenant: CurrentTenant):
    """Deliveries made after this call are signed with the new secret; the old one stops verifying."""
    return WebhookSecret(webhook_secret=tenants.rotate_webhook_secret(session=session, tenant=tenant))

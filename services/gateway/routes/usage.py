"""/v1/usage: what the tenant's finished jobs used, per day, month or in total (shared/usage.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from shared.usage import report_range, usage_totals

from ..deps import AuthenticatedRoute, CurrentTenant, SessionDep
from ..openapi import errors

# A calendar day, as a string: pydantic's date would also take numbers (as Unix times).
DAY = {"pattern": r"^\d{4}-\d{2}-\d{2}$", "json_schema_extra": {"format": "date"}, "examples": ["2026-11-29"]}
StartDay = Annotated[str | None, Query(description="first UTC day (default: 29 days before end)", **DAY)]
EndDay = Annotated[str | None, Query(description="last UTC day, included (default: today)", **DAY)]

router = APIRouter(route_class=AuthenticatedRoute, prefix="/v1/usage", tags=["usage"], responses=errors(401, 422, 503))


class UsagePeriod(BaseModel):
    period: str = Field(description="YYYY-MM-DD, YYYY-MM or 'total'", examples=["2026-11-29"])
    kind: Literal["training", "generation", "evaluation"]
    jobs: int = Field(description="finished jobs (succeeded, failed or canceled)")
    worker_seconds: float = Field(description="wall-clock seconds of workers on these jobs (a batch's time is shared)")
    images: int
    steps: int = Field(description="training steps, or denoising steps of the generations")
    pixels: int = Field(description="pixels produced: width x height per image (trainings: per step)")
    devices: dict[str, float] = Field(description="worker seconds per device, e.g. {'cuda:NVIDIA H100': 12.5}")


class UsageReport(BaseModel):
    start: str
    end: str
    granularity: Literal["day", "month", "total"]
    data: list[UsagePeriod]


@router.get("", response_model=UsageReport, summary="This tenant's usage", responses=errors(400))
def get_usage(
    session: SessionDep,
    tenant: CurrentTenant,
    start: StartDay = None,
    end: EndDay = None,
    granularity: Literal["day", "month", "total"] = "day",
):
    """Totals of the tenant's finished jobs per period and kind; periods without usage are left out (366 days
    at most per request). Each job is recorded once, when it ends, with the worker time it took."""
    first, last = report_range(start, end)
    data = usage_totals(session, tenant.id, first, last, granularity)
    body = {"start": first.isoformat(), "end": last.isoformat(), "granularity": granularity, "data": data}
    return body

"""Usage metering: one ``usage_records`` row per finished job (written with the job's final status, in the same
transaction), and the totals per tenant and period that ``GET /v1/usage`` and ``krona admin usage`` report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import UsageRecord, utcnow
from shared.errors import BadRequest

__all__ = ["GRANULARITIES", "MAX_DAYS", "Usage", "default_range", "new_record", "parse_day", "usage_totals"]

GRANULARITIES = ("day", "month", "total")
MAX_DAYS = 366


@dataclass
class Usage:
    """What a job used: the worker's wall-clock seconds on it, the device, and the work done."""

    worker_seconds: float
    device: str
    images: int = 0
    steps: int = 0
    pixels: int = 0


def new_record(tenant_id: str, kind: str, job_id: str, status: str, usage: Usage) -> UsageRecord:
    now = utcnow()
    return UsageRecord(
        tenant_id=tenant_id,
        kind=kind,
        job_id=job_id,
        status=status,
        device=usage.device[:64],
        worker_seconds=round(max(0.0, usage.worker_seconds), 6),
        images=usage.images,
        steps=usage.steps,
        pixels=usage.pixels,
        day=now.date().isoformat(),
        finished_at=now,
    )


def _period(day: str, granularity: str) -> str:
    return {"day": day, "month": day[:7], "total": "total"}[granularity]


def usage_totals(
    session: Session, tenant_id: str | None, start: date, end: date, granularity: str = "day"
) -> list[dict[str, Any]]:
    """Totals per period (UTC days from ``start`` to ``end`` inclusive), per kind of job, for one tenant (or every
    tenant with ``tenant_id=None``). Each entry: period, tenant_id, kind, jobs, worker_seconds, images, steps,
    pixels, devices ({device: seconds}). Periods without usage are left out."""
    if granularity not in GRANULARITIES:
        raise BadRequest("invalid_range", f"granularity is one of {', '.join(GRANULARITIES)}")
    if end < start:
        raise BadRequest("invalid_range", "end is before start")
    if (end - start).days + 1 > MAX_DAYS:
        raise BadRequest("invalid_range", f"at most {MAX_DAYS} days at once")
    query = (
        select(
            UsageRecord.tenant_id,
            UsageRecord.day,
            UsageRecord.kind,
            UsageRecord.device,
            func.count(),
            func.sum(UsageRecord.worker_seconds),
            func.sum(UsageRecord.images),
            func.sum(UsageRecord.steps),
            func.sum(UsageRecord.pixels),
        )
        .where(UsageRecord.day >= start.isoformat(), UsageRecord.day <= end.isoformat())
        .group_by(UsageRecord.tenant_id, UsageRecord.day, UsageRecord.kind, UsageRecord.device)
    )
    if tenant_id is not None:
        query = query.where(UsageRecord.tenant_id == tenant_id)
    totals: dict[tuple[str, str, str], dict[str, Any]] = {}
    for tenant, day, kind, device, jobs, seconds, images, steps, pixels in session.execute(query):
        key = (_period(day, granularity), tenant, kind)
        entry = totals.setdefault(
            key,
            {
                "period": key[0],
                "tenant_id": tenant,
                "kind": kind,
                "jobs": 0,
                "worker_seconds": 0.0,
                "images": 0,
                "steps": 0,
                "pixels": 0,
                "devices": {},
            },
        )
        entry["jobs"] += int(jobs)
        entry["worker_seconds"] += float(seconds or 0)
        entry["images"] += int(images or 0)
        entry["steps"] += int(steps or 0)
        entry["pixels"] += int(pixels or 0)
        entry["devices"][device] = entry["devices"].get(device, 0.0) + float(seconds or 0)
    for entry in totals.values():
        entry["worker_seconds"] = round(entry["worker_seconds"], 3)
        entry["devices"] = {k: round(v, 3) for k, v in sorted(entry["devices"].items())}
    return [totals[k] for k in sorted(totals)]


# The days a usage report may name: no job ran before 2000, and a range must leave room for arithmetic.
EARLIEST_DAY = date(2000, 1, 1)
LATEST_DAY = date(9000, 12, 31)


def default_range(today: date | None = None) -> tuple[date, date]:
    """The last 30 days, today included."""
    today = today or utcnow().date()
    return today - timedelta(days=29), today


def report_range(start: str | None, end: str | None, names: tuple[str, str] = ("start", "end")) -> tuple[date, date]:
    """The days a usage report covers: ``start`` to ``end`` (YYYY-MM-DD, both included), by default the 30 days up
    to ``end`` (itself today by default); BadRequest ``invalid_range`` naming the bad one (``names``: what the
    caller calls them)."""
    first, last = parse_day(start, names[0]), parse_day(end, names[1])
    default_first, default_last = default_range(last)
    return first or default_first, last or default_last


def parse_day(text: str | None, what: str) -> date | None:
    """A YYYY-MM-DD date (or an ISO timestamp, whose UTC date is taken); BadRequest ``invalid_range`` naming
    ``what``."""
    if text is None or text == "":
        return None
    try:
        day = (
            date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text.replace("Z", "+00:00")).date()
        )
    except ValueError:
        raise BadRequest("invalid_range", f"{what} is not a date (YYYY-MM-DD)") from None
    if not EARLIEST_DAY <= day <= LATEST_DAY:  # date arithmetic near year 1 or 9999 overflows
        raise BadRequest("invalid_range", f"{what} must be between {EARLIEST_DAY} and {LATEST_DAY}")
    return day

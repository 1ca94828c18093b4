"""`krona usage`: what the tenant's finished jobs used (GET /v1/usage)."""

from __future__ import annotations

import argparse

from services.cli.commands import api_command, note
from services.cli.connection import connect
from services.cli.output import emit, output_format


def register(sub) -> None:
    usage = api_command(sub, "usage", show_usage)
    usage.add_argument("--start", metavar="YYYY-MM-DD", help="first UTC day (default: 29 days before --end)")
    usage.add_argument("--end", metavar="YYYY-MM-DD", help="last UTC day, included (default: today)")
    usage.add_argument("--granularity", default="day", choices=("day", "month", "total"), help="one row per")


def show_usage(args: argparse.Namespace) -> int:
    """worker time and work done by this tenant's jobs, per day, month or in total

    Examples:
        krona usage
        krona usage --start 2026-11-01 --end 2026-11-30 --granularity total -o json
    """
    with connect(args) as client:
        report = client.usage(start=args.start, end=args.end, granularity=args.granularity)
    fmt = output_format(args)
    if fmt in ("json", "yaml"):
        emit(report, fmt)
        return 0
    note(f"usage {report.start} to {report.end} (UTC), per {report.granularity}:")
    emit(report.data, fmt, "usage")
    return 0

"""`krona tenants …`: tenants through the API, with an admin key (/v1/tenants). On the server's own machine,
`krona admin …` does the same straight on the database."""

from __future__ import annotations

import argparse

from services.cli.commands import Resource, api_command, note
from services.cli.connection import CliError, connect
from services.cli.output import emit, output_format

LIMITS = ("rate_limit_per_second", "rate_limit_burst", "max_queued_jobs", "max_running_jobs", "max_generation_compute")


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weight and limits (unset: the server's defaults)")
    group.add_argument(
        "--weight", type=float, metavar="W", help="share of the workers under contention, >0 and <=1000 (default 1)"
    )
    group.add_argument("--rate-limit-per-second", type=float, metavar="X", help="requests per second per key (0: none)")
    group.add_argument("--rate-limit-burst", type=int, metavar="N", help="token bucket size")
    group.add_argument(
        "--max-queued-jobs", type=int, metavar="N", help="queued trainings, generations and evaluations (0: no cap)"
    )
    group.add_argument("--max-running-jobs", type=int, metavar="N", help="running jobs per queue (0: no cap)")
    group.add_argument(
        "--max-generation-compute", type=int, metavar="N", help="width x height x steps x images of one generation"
    )


def add_clear_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clear",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        type=lambda name: name.replace("-", "_"),
        choices=["weight", *LIMITS],
        help="put these back to the server's default (weight: back to 1)",
    )


def _limits(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}


TENANTS = Resource("tenants", "tenant", "TENANT_ID", "ten_", admin=True)


def register(sub) -> None:
    """tenants, through the API with an admin key (create, list, get, update, delete)

    Tenants, with an admin key (krona admin create-admin-key; pass it as --api-key or KRONA_ADMIN_KEY).
    """
    actions = TENANTS.group(sub, register)
    create = api_command(actions, "create", create_tenant, admin=True)
    create.add_argument("name", metavar="NAME", help="1-100 letters, digits, '-', '_' or '.'; unique")
    add_limit_options(create)

    TENANTS.listing(
        actions, "every tenant with its weight and limit overrides", ["krona tenants list -o wide"], limit=100
    )
    TENANTS.command(actions, "get", TENANTS.show, help="one tenant with the limits in effect")

    update = TENANTS.command(actions, "update", update_tenant)
    add_limit_options(update)
    add_clear_option(update)

    delete = TENANTS.command(actions, "delete", delete_tenant, output=False)
    delete.add_argument("--yes", action="store_true", help="required: confirms the deletion")


def create_tenant(args: argparse.Namespace) -> int:
    """create a tenant; prints its API key and webhook secret once

    Examples:
        krona tenants create acme --weight 2 --max-queued-jobs 500
    """
    with connect(args, admin=True) as client:
        created = client.tenants.create(args.name, weight=args.weight, limits=_limits(args) or None)
    fmt = output_format(args)
    if fmt in ("table", "wide"):
        tenant = created.tenant
        note(f"tenant {tenant.name} ({tenant.id}) created; its webhook signing secret (shown once):")
        print(created.webhook_secret)
        note("its API key (shown once):")
        print(created.api_key)
    else:
        emit(created, fmt)
    return 0


def update_tenant(args: argparse.Namespace) -> int:
    """change a tenant's weight or limit overrides (others are kept)

    Examples:
        krona tenants update ten_… --rate-limit-per-second 20
        krona tenants update ten_… --clear max-queued-jobs
    """
    limits = _limits(args)
    given = {*limits, *(["weight"] if args.weight is not None else [])}
    both = sorted(given & set(args.clear))
    if both:
        raise CliError(f"{', '.join(both)}: set and cleared at once; give one")
    if not given and not args.clear:
        raise CliError("nothing to change: give --weight, a limit (e.g. --max-queued-jobs 100) or --clear NAME")
    with connect(args, admin=True) as client:
        tenant = client.tenants.update(args.id, weight=args.weight, limits=limits or None, clear=args.clear)
    note(f"tenant {tenant.name}: weight {tenant.weight:g}")
    emit(tenant, output_format(args), "tenant")
    return 0


def delete_tenant(args: argparse.Namespace) -> int:
    """delete a tenant with all its rows and files (no undo)

    Examples:
        krona tenants delete ten_… --yes
    """
    if not args.yes:
        raise CliError(f"this deletes tenant {args.id} with all its jobs, adapters, keys, usage and files; add --yes")
    with connect(args, admin=True) as client:
        client.tenants.delete(args.id)
    note(f"deleted tenant {args.id} with all its rows and files")
    return 0

"""`krona admin …`: operator commands run straight on the database (``--data-dir`` for the embedded stack, or
KRONA_DATABASE_URL): tenants, keys, limits, usage, webhook secrets, a retention sweep. They share the gateway's
service functions (services/gateway/services/tenants.py), so the command line and the API cannot drift apart.

They never create a database: one that does not exist, or is not migrated, is a one-line error that says to run
`krona up` or `krona migrate`. They print tables (``-o json|yaml`` for scripts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.cli.commands import HelpFormatter, add_leaf
from services.cli.commands.tenants import LIMITS as LIMIT_NAMES
from services.cli.commands.tenants import add_clear_option, add_limit_options
from services.cli.connection import CliError
from services.cli.output import emit, print_table
from services.cli.stack import _settings
from shared.errors import ServiceError
from shared.storage import storage_from_settings

DATA_DIR_HELP = "the embedded data folder (default: $KRONA_DATA_DIR, else .krona; ignored with KRONA_DATABASE_URL)"


def _command(actions, name: str, handler, *, tenant: str | None = None, output: bool = True, on_database: bool = True,
             **kwargs) -> argparse.ArgumentParser:  # fmt: skip
    """An operator command: ``--data-dir``, ``-o`` (table by default) unless ``output`` is False, a TENANT
    argument when ``tenant`` names its help, and the handler, run on the checked database (``_database``) unless
    ``on_database`` is False."""
    parser = add_leaf(actions, name, handler, **kwargs)
    if tenant:
        parser.add_argument("tenant", metavar="TENANT", help=tenant)
    parser.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    if output:
        parser.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default="table",
                            metavar="FORMAT", help="table, wide, json or yaml (default: table)")  # fmt: skip
    parser.set_defaults(handler=_database(handler) if on_database else handler)
    return parser


TENANT = "the tenant's name or id"


def register(sub) -> None:
    admin = sub.add_parser(
        "admin",
        help="operator commands on the database: tenants, keys, limits, usage, retention",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=HelpFormatter,
    )
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")

    tenant = _command(actions, "create-tenant", create_tenant)
    tenant.add_argument("name", metavar="NAME", help="1-100 letters, digits, '-', '_' or '.'; unique")
    rotate = _command(actions, "rotate-webhook-secret", rotate_webhook_secret)
    rotate.add_argument("name", metavar="TENANT", help="the tenant's name")
    _register_key_commands(actions)
    _register_tenant_commands(actions)
    _register_usage_commands(actions)


def _register_key_commands(actions) -> None:
    admin_key = _command(actions, "create-admin-key", create_admin_key)
    admin_key.add_argument("--name", help="a label for people")
    create_key = _command(actions, "create-key", create_tenant_key, tenant=TENANT)
    create_key.add_argument("--name", help="a label for people")
    _command(actions, "list-keys", list_tenant_keys, tenant=TENANT)
    revoke = _command(actions, "revoke-key", revoke_tenant_key)
    revoke.add_argument("key_id", metavar="KEY_ID", help="key_… (krona admin list-keys TENANT)")


def _register_tenant_commands(actions) -> None:
    _command(actions, "list-tenants", list_all_tenants)
    limits = _command(actions, "set-limits", set_limits, tenant=TENANT)
    add_limit_options(limits)
    add_clear_option(limits)
    delete = _command(actions, "delete-tenant", delete_tenant, tenant=TENANT)
    delete.add_argument("--yes", action="store_true", help="required: confirms the deletion")


def _register_usage_commands(actions) -> None:
    usage = _command(actions, "usage", tenant_usage)
    usage.add_argument("--tenant", help="one tenant's name or id (default: every tenant)")
    usage.add_argument("--start", help="first UTC day, YYYY-MM-DD (default: 29 days before --end)")
    usage.add_argument("--end", help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--granularity", default="day", choices=["day", "month", "total"], help="one row per")
    usage.add_argument("--json", action="store_const", const="json", dest="output", help="the same as -o json")
    sweep = _command(actions, "sweep", run_sweep, output=False, on_database=False)
    sweep.add_argument("--json", action="store_true", help="print the counts as JSON")


# The database ------------------------------------------------------------------------------------------------


def checked_settings(data_dir: str | None):
    """Settings whose database exists and is migrated (CliError otherwise: this never creates one)."""

    # lazy: loads sqlalchemy
    from shared.db import DatabaseNotMigrated, check_migrated, make_engine

    settings = _settings(data_dir)
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CliError(
                f"no database at {path}: start the service once (krona up --data-dir {settings.data_dir}) or run "
                f"`krona migrate --data-dir {settings.data_dir}`; for another folder pass --data-dir, for a server "
                "set KRONA_DATABASE_URL"
            )
    engine = make_engine(url)
    try:
        check_migrated(engine)
    except DatabaseNotMigrated as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:  # unreachable server, bad URL: one line, not a traceback
        raise CliError(f"cannot open the database {url.split('@')[-1]}: {exc.__class__.__name__}: {exc}") from None
    finally:
        engine.dispose()
    return settings


def _database(handler):
    """Run ``handler(args, settings, session)`` on the checked database."""

    def run(args: argparse.Namespace) -> int:
        # lazy: loads sqlalchemy
        from shared.db import make_engine, make_session_factory

        settings = checked_settings(args.data_dir)
        engine = make_engine(settings.resolved_database_url)
        try:
            with make_session_factory(engine)() as session:
                return handler(args, settings, session)
        finally:
            engine.dispose()

    return run


def _find_tenant(session, reference: str):
    # lazy: loads sqlalchemy, fastapi, pydantic, …
    from services.gateway.services.tenants import find_tenant

    return find_tenant(session, reference)  # ValueError: a one-line error


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _structured(args: argparse.Namespace) -> bool:
    return args.output in ("json", "yaml")


def _shown_once(args: argparse.Namespace, data: dict, *lines: str) -> int:
    """A secret made now: ``data`` for -o json/yaml, else ``lines`` (what it is, the secret, …) one per line."""
    if _structured(args):
        emit(data, args.output)
    else:
        print("\n".join(lines))
    return 0


# Handlers ----------------------------------------------------------------------------------------------------


def create_tenant(args, settings, session) -> int:
    """create a tenant and print its webhook signing secret and API key once

    Examples:
        krona admin create-tenant acme
        krona admin create-tenant acme --data-dir out/demo/krona-data
    """
    # lazy: loads sqlalchemy
    from shared.tenants import create_tenant as create

    tenant, key = create(session, args.name)
    session.commit()
    data = {"id": tenant.id, "name": tenant.name, "api_key": key, "webhook_secret": tenant.webhook_secret}
    return _shown_once(
        args,
        data,
        f"tenant {tenant.name} ({tenant.id}) created; its webhook signing secret (shown once):",
        tenant.webhook_secret,
        "its API key (shown once):",
        key,
    )


def rotate_webhook_secret(args, settings, session) -> int:
    """give a tenant a new webhook signing secret and print it once

    Examples:
        krona admin rotate-webhook-secret acme
    """
    # lazy: loads sqlalchemy
    from sqlalchemy import select

    # lazy: loads sqlalchemy
    from shared.db import Tenant
    from shared.tenants import rotate_webhook_secret as rotate

    tenant = session.scalar(select(Tenant).where(Tenant.name == args.name))
    if tenant is None:
        raise CliError(f"no tenant {args.name!r} (krona admin list-tenants)")
    secret = rotate(session, tenant)
    session.commit()
    said = f"tenant {args.name}: new webhook signing secret (shown once; deliveries from now on use it):"
    return _shown_once(args, {"tenant": args.name, "webhook_secret": secret}, said, secret)


def create_admin_key(args, settings, session) -> int:
    """create an admin key (for `krona tenants` and /v1/tenants); shown once

    Examples:
        krona admin create-admin-key --name ops
    """
    # lazy: loads sqlalchemy
    from shared.tenants import new_api_key

    key, row = new_api_key(session, None, name=args.name, role="admin")
    session.commit()
    said = f"admin key {row.id} created; the key (shown once; it manages tenants through /v1/tenants):"
    return _shown_once(args, {"id": row.id, "name": row.name, "role": "admin", "key": key}, said, key)


def create_tenant_key(args, settings, session) -> int:
    """create an API key for a tenant and print it once

    Examples:
        krona admin create-key acme --name ci
    """
    # lazy: loads sqlalchemy
    from shared.tenants import new_api_key

    tenant = _find_tenant(session, args.tenant)
    key, row = new_api_key(session, tenant, name=args.name)
    session.commit()
    said = f"API key {row.id} created for tenant {tenant.name}; the key (shown once):"
    return _shown_once(args, {"id": row.id, "tenant": tenant.name, "name": row.name, "key": key}, said, key)


def list_tenant_keys(args, settings, session) -> int:
    """a tenant's API keys (prefix, name, times; never the key)

    Examples:
        krona admin list-keys acme
    """
    # lazy: loads sqlalchemy, pydantic
    from sqlalchemy import select

    # lazy: loads sqlalchemy
    from shared.db import ApiKey
    from shared.schemas import api_key_public

    tenant = _find_tenant(session, args.tenant)
    rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)).all()
    if _structured(args):
        emit({"data": [api_key_public(r) for r in rows]}, args.output)
        return 0
    print_table(
        ["id", "prefix", "name", "created", "last used", "revoked"],
        [
            [r.id, r.prefix + "…", r.name or "", _when(r.created_at), _when(r.last_used_at), _when(r.revoked_at)]
            for r in rows
        ],
    )
    return 0


def revoke_tenant_key(args, settings, session) -> int:
    """revoke an API key (its next request answers 401)

    Examples:
        krona admin revoke-key key_…
    """
    # lazy: loads sqlalchemy, fastapi, pydantic, …
    from services.gateway.services.tenants import revoke_key

    try:
        revoked = revoke_key(session=session, tenant=None, key_id=args.key_id)
    except ServiceError as exc:
        raise CliError(f"{exc.message} (krona admin list-keys TENANT)") from None
    print(f"API key {args.key_id} {'revoked' if revoked else 'was already revoked'}")
    return 0


def list_all_tenants(args, settings, session) -> int:
    """every tenant with its weight and limit overrides

    Examples:
        krona admin list-tenants
    """
    # lazy: loads sqlalchemy, pydantic
    from sqlalchemy import select

    # lazy: loads sqlalchemy
    from shared.db import Tenant
    from shared.schemas import tenant_public

    rows = session.scalars(select(Tenant).order_by(Tenant.created_at)).all()
    if _structured(args):
        emit({"data": [tenant_public(r, settings) for r in rows]}, args.output)
        return 0
    if args.output == "wide":
        emit([tenant_public(r, settings) for r in rows], "wide", "tenant")
        return 0
    overrides = [", ".join(f"{k}={_number(v)}" for k, v in sorted((r.limits or {}).items())) for r in rows]
    print_table(
        ["id", "name", "weight", "limit overrides", "created"],
        [[r.id, r.name, f"{r.weight:g}", o or "-", _when(r.created_at)] for r, o in zip(rows, overrides, strict=True)],
    )
    return 0


def set_limits(args, settings, session) -> int:
    """set a tenant's weight and limit overrides (others are kept)

    Set a tenant's fair-share weight and overrides of the server's limits; --clear NAME puts a limit back to the
    server's default. Prints the limits in effect.

    Examples:
        krona admin set-limits acme --weight 2 --max-queued-jobs 500
        krona admin set-limits acme --clear weight
    """
    # lazy: loads sqlalchemy, fastapi, pydantic, …
    from pydantic import ValidationError

    # lazy: loads sqlalchemy, fastapi
    from services.gateway.services.tenants import DEFAULT_WEIGHT, apply_limits
    from shared.limits import tenant_limits
    from shared.schemas import TenantUpdate, tenant_public

    tenant = _find_tenant(session, args.tenant)
    given = {name: getattr(args, name) for name in LIMIT_NAMES if getattr(args, name) is not None}
    both = sorted(set(args.clear) & ({*given, "weight"} if args.weight is not None else set(given)))
    if both:
        raise CliError(f"{', '.join(both)}: set and cleared at once; give one")
    if not given and args.weight is None and not args.clear:
        raise CliError("nothing to change: give --weight, a limit (e.g. --max-queued-jobs 100) or --clear NAME")
    try:  # the API's own checks (ranges), with the API's body model
        TenantUpdate.model_validate({"weight": args.weight, "limits": given}, strict=False)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = "--" + str(error["loc"][-1]).replace("_", "-")
        raise CliError(f"{field}: {error['msg']}") from None
    if args.weight is not None:
        tenant.weight = args.weight
    elif "weight" in args.clear:
        tenant.weight = DEFAULT_WEIGHT
    apply_limits(tenant, {**given, **{name: None for name in args.clear if name != "weight"}})
    session.commit()
    if _structured(args):
        emit(tenant_public(tenant, settings), args.output)
        return 0
    limits = tenant_limits(settings, tenant.limits)
    print(f"tenant {tenant.name}: weight {tenant.weight:g}")
    print_table(
        ["limit", "in effect", "source"],
        [
            [name, _number(getattr(limits, name)), "override" if name in tenant.limits else "default"]
            for name in LIMIT_NAMES
        ],
    )
    return 0


def delete_tenant(args, settings, session) -> int:
    """delete a tenant with all its rows and files (no undo)

    Examples:
        krona admin delete-tenant acme --yes
    """
    # lazy: loads sqlalchemy, fastapi, pydantic, …
    from services.gateway.services.tenants import delete_tenant as delete

    tenant = _find_tenant(session, args.tenant)
    if not args.yes:
        raise CliError(
            f"this deletes tenant {tenant.name} ({tenant.id}) with all its jobs, adapters, keys, usage and files; "
            "add --yes to do it"
        )
    name, tenant_id = tenant.name, tenant.id
    blobs = delete(session=session, storage=storage_from_settings(settings), tenant_id=tenant_id)
    if blobs is None:
        print(
            f"krona admin: tenant {name} ({tenant_id}) deleted, but its files under tenants/{tenant_id}/ could not be "
            "removed (storage unreachable); the storage sweep removes them",
            file=sys.stderr,
        )
        return 1
    print(f"tenant {name} ({tenant_id}) deleted with all its rows and {blobs} files")
    return 0


def tenant_usage(args, settings, session) -> int:
    """worker time and work done per tenant and period

    Examples:
        krona admin usage --tenant acme --granularity month
    """
    # lazy: loads sqlalchemy
    from sqlalchemy import select

    # lazy: loads sqlalchemy
    from shared.db import Tenant
    from shared.usage import report_range, usage_totals

    tenant_id = _find_tenant(session, args.tenant).id if args.tenant else None
    start, end = report_range(args.start, args.end, ("--start", "--end"))
    totals = usage_totals(session, tenant_id, start, end, args.granularity)
    if _structured(args):
        emit({"start": start.isoformat(), "end": end.isoformat(), "data": totals}, args.output)
        return 0
    names = dict(session.execute(select(Tenant.id, Tenant.name)).all())
    print(f"usage {start} to {end} (UTC), per {args.granularity}:")
    print_table(
        ["period", "tenant", "kind", "jobs", "worker s", "images", "steps", "pixels", "devices (s)"],
        [
            [
                e["period"],
                names.get(e["tenant_id"], e["tenant_id"]),
                e["kind"],
                e["jobs"],
                f"{e['worker_seconds']:.1f}",
                e["images"],
                e["steps"],
                f"{e['pixels']:,}",
                ", ".join(f"{d}={s:.1f}" for d, s in e["devices"].items()),
            ]
            for e in totals
        ],
    )
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """run one retention pass now: purge ended trainings' photos, expire old images, delete orphaned blobs

    Run one retention pass now (what the workers' retention loop does on its schedule) and print what each step
    removed. Exit status 1 if a step failed.

    Examples:
        krona admin sweep
        krona admin sweep --json
    """
    # lazy: loads sqlalchemy, pydantic
    from workers.retention import run_retention
    from workers.runtime import build_runtime

    counts = run_retention(build_runtime(checked_settings(args.data_dir)))
    if args.json:
        print(json.dumps(counts, sort_keys=True))
    else:
        width = max(map(len, counts))
        for name, value in counts.items():
            print(f"{name.ljust(width)}  {value}")
    return 1 if counts["errors"] else 0

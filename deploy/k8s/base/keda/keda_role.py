"""KEDA's PostgreSQL role: created if missing, given exactly what the autoscaler's queries read, checked by running
those queries as that role.

KEDA's PostgreSQL scaler logs in with ``POSTGRES_CONNECTION`` (deploy/k8s/base/keda.env, a libpq URL) and runs
the queries of keda/train.sql and keda/infer.sql. This script makes that work with the least the role needs:

- the role named in that URL, created with its password (``LOGIN NOINHERIT``, at most 4 connections,
  read-only transactions, a 10 s statement timeout) when the application's role may create roles (an existing
  one is given that password and those limits); a role that is a superuser, may create roles, replicate or
  bypass row security is refused;
- ``SELECT`` on the columns the queries read (``READS``), nothing else: what the role had on those tables before
  (e.g. a whole-table grant) is revoked first, in the same transaction;
- then it logs in as that role, with that URL, and runs each query: a wrong password, a missing grant, a
  network policy in the way or a query that no longer matches the schema ends the run with the reason.

It refuses a password left at the example's placeholder. It is run by the Deployment ``krona-keda-role``
(deploy/k8s/base/keda-role.yaml) on the gateway image, every 5 minutes, so that a new keda.env, a migration or a
grant changed by hand is put right within minutes; any failure ends the process (status 1), and the pod's
CrashLoopBackOff and its log show why. A database administrator can run it once by hand where the application's
role may not create roles (the message says so), from a checkout:

    KRONA_DATABASE_URL='postgresql://admin@db.example.com/krona' \\
    POSTGRES_CONNECTION='postgresql://krona_keda:<password>@db.example.com:5432/krona?sslmode=require' \\
        python deploy/k8s/base/keda/keda_role.py --queries deploy/k8s/base/keda/train.sql deploy/k8s/base/keda/infer.sql

Only psycopg (3) is needed; tests/test_deploy_keda.py runs this file on a migrated database.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

# The columns the queries of keda/*.sql read, table by table. The role may SELECT these and nothing else.
READS: dict[str, tuple[str, ...]] = {
    "trainings": ("status",),
    "evaluations": ("status",),
    "generations": ("status",),
}
# Tables on which an earlier version of this setup (or deploy/README.md before it) granted more; revoked too.
FORMERLY_READ = ("adapters",)
PLACEHOLDERS = {"", "change-me"}
ROLE_OPTIONS = "LOGIN NOINHERIT CONNECTION LIMIT 4"
ROLE_SETTINGS = {"default_transaction_read_only": "on", "statement_timeout": "10s"}


class SetupError(Exception):
    """What an operator must fix; printed without a traceback."""


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) as libpq reads it."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+')[0]}{sep}{rest}" if sep else url


def keda_login(connection: str) -> tuple[str, str]:
    """The role and password of KEDA's connection URL (percent-decoded, as libpq reads them)."""
    try:
        params = conninfo_to_dict(connection)
    except psycopg.ProgrammingError as exc:
        raise SetupError(f"POSTGRES_CONNECTION (keda.env) is not a libpq URL: {exc}") from None
    role, password = params.get("user"), params.get("password")
    if not role:
        raise SetupError("POSTGRES_CONNECTION (keda.env) names no user: postgresql://ROLE:PASSWORD@HOST:5432/DB")
    if password is None or str(password).strip() in PLACEHOLDERS:
        raise SetupError(
            f"POSTGRES_CONNECTION (keda.env) still has the example's password for {role!r}: set a real one "
            "(keda.env is copied from keda.env.example and must be edited)"
        )
    return str(role), str(password)


def grant_reads(admin_url: str, role: str, password: str) -> str:
    """Create ``role`` if missing (or set its password), and leave it exactly the SELECTs of ``READS``. Returns
    what was done, for the log."""
    done = []
    with psycopg.connect(libpq_url(admin_url), autocommit=False, connect_timeout=10) as conn:
        me, may_manage_roles = conn.execute(
            "SELECT current_user, rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        found = conn.execute(
            "SELECT rolsuper OR rolcreaterole OR rolbypassrls OR rolreplication FROM pg_roles WHERE rolname = %s",
            [role],
        ).fetchone()
        ident = sql.Identifier(role)
        if found is None:
            if not may_manage_roles:
                raise SetupError(
                    f"role {role!r} does not exist and {me!r} (KRONA_DATABASE_URL) may not create roles: have a "
                    f"database administrator run, once, CREATE ROLE {role} {ROLE_OPTIONS} PASSWORD '<the password "
                    "of keda.env>' (or this script with an administrator's KRONA_DATABASE_URL); this pod then grants "
                    "the reads"
                )
            # A SCRAM verifier made here: the password itself never appears in a statement (nor in a server log).
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
            conn.execute(sql.SQL(f"CREATE ROLE {{}} {ROLE_OPTIONS} PASSWORD {{}}").format(ident, sql.Literal(verifier)))
            done.append("created")
        elif found[0]:
            raise SetupError(f"role {role!r} is a superuser or may create roles, replicate or bypass row security: "
                             "KEDA needs none of that; give it a role of its own")  # fmt: skip
        elif may_manage_roles:  # keda.env may have a new password: the role follows it (and keeps its limits)
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
            alter = sql.SQL(f"ALTER ROLE {{}} {ROLE_OPTIONS} PASSWORD {{}}").format(ident, sql.Literal(verifier))
            if not _try(conn, alter):
                # PostgreSQL 16+: CREATEROLE manages only the roles it was given (an administrator made this one).
                may_manage_roles = False
                done.append(f"password and limits left to the administrator ({me!r} may not alter the role)")
        if may_manage_roles:
            for name, value in ROLE_SETTINGS.items():
                setting = sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(name), sql.Literal(value))
                conn.execute(setting)
        tables = [t for t in (*READS, *FORMERLY_READ) if conn.execute("SELECT to_regclass(%s)", [t]).fetchone()[0]]
        missing = sorted(set(READS) - set(tables))
        if missing:
            raise SetupError(f"tables {missing} do not exist yet: the gateway's init container migrates the database")
        every_table = sql.SQL(", ").join(map(sql.Identifier, tables))
        conn.execute(sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(every_table, ident))
        for table, columns in READS.items():
            conn.execute(
                sql.SQL("GRANT SELECT ({}) ON TABLE {} TO {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table), ident
                )
            )
        conn.commit()
    done.append("granted " + ", ".join(f"{t}({', '.join(c)})" for t, c in READS.items()))
    return "; ".join(done)


def _try(conn: psycopg.Connection, statement: sql.Composable) -> bool:
    """Run ``statement`` in a savepoint; False (and nothing changed) when the role may not."""
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def run_queries(connection: str, queries: list[Path]) -> dict[str, float]:
    """Each query run as KEDA runs it: logged in with KEDA's URL, one number back."""
    results = {}
    with psycopg.connect(connection, autocommit=True, connect_timeout=10) as conn:
        for path in queries:
            row = conn.execute(path.read_text()).fetchone()
            if row is None or len(row) != 1 or not isinstance(row[0], int | float):
                raise SetupError(f"{path.name} must answer one number, got {row!r}")
            results[path.name] = float(row[0])
    return results


def reconcile(admin_url: str, connection: str, queries: list[Path]) -> str:
    role, password = keda_login(connection)
    done = grant_reads(admin_url, role, password)
    counts = run_queries(connection, queries)
    return f"role {role}: {done}; as {role}: " + ", ".join(f"{name} = {value:g}" for name, value in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", nargs="+", type=Path, required=True, help="the scaler queries (keda/*.sql)")
    parser.add_argument(
        "--connection-file", type=Path, help="read POSTGRES_CONNECTION from this file (a mounted Secret: read each run)"
    )
    parser.add_argument("--every", type=float, default=0, help="run again every this many seconds (0: once)")
    args = parser.parse_args(argv)
    admin_url = os.environ.get("KRONA_DATABASE_URL", "")
    while True:
        try:
            if not admin_url.startswith("postgresql"):
                raise SetupError("KRONA_DATABASE_URL must be the PostgreSQL database KEDA reads")
            if args.connection_file:
                connection = args.connection_file.read_text().strip()
            else:
                connection = os.environ.get("POSTGRES_CONNECTION", "")
            print(f"krona-keda-role: {reconcile(admin_url, connection, args.queries)}", flush=True)
        except (SetupError, psycopg.Error, OSError) as exc:
            print(f"krona-keda-role: error: {exc.__class__.__name__}: {exc}".rstrip(), file=sys.stderr, flush=True)
            return 1
        if not args.every:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())

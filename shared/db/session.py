"""Engines and sessions; the check that refuses a database whose schema the code cannot run on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = [
    "DatabaseNewerThanCode",
    "DatabaseNotMigrated",
    "check_migrated",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
log = logging.getLogger("krona.db")


class DatabaseNotMigrated(RuntimeError):
    """The database schema is not one the code can run on (older than the code's migration head, or none)."""


class DatabaseNewerThanCode(DatabaseNotMigrated):
    """The database was migrated by a newer release whose schema this code cannot run on."""


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 20, pool_timeout: float = 30.0, pre_ping: bool = True
) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys (the embedded mode has two processes).

    The gateway sizes the pool from its threadpool (``Settings.gateway_threads``), so that a thread never
    waits for a connection; workers keep the defaults.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") and "connect_timeout" not in url else {}
    return create_engine(
        url,
        pool_pre_ping=pre_ping,
        # Bulk inserts in pages of 100 rows: psycopg converts (and caches) one 100-row statement instead of
        # parsing a fresh 1000-row one for every batch.
        insertmanyvalues_page_size=100,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def _scripts() -> ScriptDirectory:
    # lazy: loads sqlalchemy, alembic
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config)


def head_revision() -> str | None:
    """The newest migration in migrations/versions (read from the files, no database needed)."""
    return _scripts().get_current_head()


def check_migrated(engine: Engine) -> None:
    """Return when the code can run on the database's schema; raise DatabaseNotMigrated (with what to do) if not.

    Accepted: the database at the code's migration head, or at a revision the code does not have (a newer
    release migrated it: the previous release's pods during a rolling upgrade, or a rollback) whose
    ``schema_compatibility.compatible_from`` is a revision the code has. Additive migrations keep
    ``compatible_from``; one that breaks older code sets it to itself (migrations/versions/0004_*.py), and
    then older code refuses with DatabaseNewerThanCode. A database older than the head, or unmigrated, is
    refused: run `krona migrate` first.
    """
    scripts = _scripts()
    head = scripts.get_current_head()
    known = {script.revision for script in scripts.walk_revisions()}
    compatible_from = None
    with engine.connect() as conn:
        current = None
        if inspect(conn).has_table("alembic_version"):
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if current is not None and current not in known and inspect(conn).has_table("schema_compatibility"):
            compatible_from = conn.execute(text("SELECT compatible_from FROM schema_compatibility")).scalar()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is not None and current not in known:
        if compatible_from in known:
            log.warning(
                "database %s is at migration %s, newer than this code's %s; it runs on code from %s on, so this "
                "code starts (deploy the newer release to finish the rollout)",
                where, current, head, compatible_from,
            )  # fmt: skip
            return
        raise DatabaseNewerThanCode(
            f"database {where} is at migration {current}, made by a newer release whose schema needs code from "
            f"migration {compatible_from or 'unknown'} on; this code has {head}: deploy the release that has "
            f"{current} (or downgrade the database with that release's `alembic downgrade {head}`)"
        )
    raise DatabaseNotMigrated(
        f"database {where} is at migration {current or 'none'}, the code needs {head}; "
        "run `krona migrate` (or `alembic upgrade head`) first"
    )


def upgrade_to_head(url: str) -> None:
    """Apply every migration (alembic upgrade head) to the database at ``url``."""
    # lazy: loads sqlalchemy, alembic
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")

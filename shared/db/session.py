"""Engines and sessions; the check that refuses an unmigrated database."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "DatabaseNotMigrated",
    "check_migrated",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class DatabaseNotMigrated(RuntimeError):
    """The database schema is not at the code's migration head."""


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
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
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


def head_revision() -> str:
    """The newest migration in migrations/versions (read from the files, no database needed)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


def check_migrated(engine: Engine) -> None:
    """Raise DatabaseNotMigrated with the command to run unless the database is at the migration head."""
    head = head_revision()
    with engine.connect() as conn:
        current = None
        if inspect(conn).has_table("alembic_version"):
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        raise DatabaseNotMigrated(
            f"database {where} is at migration {current or 'none'}, the code needs {head}; "
            "run `krona migrate` (or `alembic upgrade head`) first"
        )


def upgrade_to_head(url: str) -> None:
    """Apply every migration (alembic upgrade head) to the database at ``url``."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")

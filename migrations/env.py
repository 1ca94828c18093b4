"""Alembic environment: one history for PostgreSQL and SQLite (batch mode on SQLite)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from shared.db.models import Base
from shared.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from shared.settings import Settings

    return Settings().resolved_database_url


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=url.startswith("sqlite")
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=url.startswith("sqlite")
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Two processes migrating at once (gateway pods starting together): the second waits, then finds
                # the schema at head, instead of failing on the first's half-made tables.
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(7242200222)"))
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

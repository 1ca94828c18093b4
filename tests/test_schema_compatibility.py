"""The schema check: the code runs on its own head, and on a newer database that says it is compatible (rolling
upgrades and rollbacks); it refuses an older or unmigrated database, and a newer one that is not compatible."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from shared.db import make_engine, upgrade_to_head
from shared.db.session import DatabaseNewerThanCode, DatabaseNotMigrated, check_migrated, head_revision


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'krona.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _set(engine, revision: str, compatible_from: str | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        if compatible_from is not None:
            conn.execute(text("UPDATE schema_compatibility SET compatible_from = :c"), {"c": compatible_from})


def test_the_head_is_accepted(engine):
    check_migrated(engine)
    with engine.connect() as conn:
        # 0008 (evaluations as jobs) broke code older than itself: it set compatible_from to itself.
        assert conn.execute(text("SELECT compatible_from FROM schema_compatibility")).scalar() == "0008"


def test_a_newer_compatible_database_is_accepted(engine, caplog):
    # A newer release added a column (additive): compatible_from stays at a revision this code has.
    _set(engine, "0099_newer_release", compatible_from="0008")
    with caplog.at_level("WARNING", logger="krona.db"):
        check_migrated(engine)
    assert "newer than this code" in caplog.text
    _set(engine, "0099_newer_release", compatible_from=head_revision())
    check_migrated(engine)


def test_a_newer_incompatible_database_is_refused(engine):
    # The newer release's migration broke older code: it set compatible_from to itself.
    _set(engine, "0099_newer_release", compatible_from="0099_newer_release")
    with pytest.raises(DatabaseNewerThanCode, match="deploy the release that has 0099_newer_release"):
        check_migrated(engine)


def test_an_older_database_is_refused_with_the_command_to_run(engine):
    _set(engine, "0003")
    with pytest.raises(DatabaseNotMigrated, match="krona migrate") as raised:
        check_migrated(engine)
    assert not isinstance(raised.value, DatabaseNewerThanCode)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    with pytest.raises(DatabaseNotMigrated, match="at migration none"):
        check_migrated(engine)


def test_the_migration_goes_down_and_up_again(tmp_path):
    from alembic import command
    from alembic.config import Config

    from shared.db.session import MIGRATIONS_DIR

    url = f"sqlite:///{tmp_path / 'down.db'}"
    upgrade_to_head(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    command.downgrade(config, "0003")
    engine = make_engine(url)
    with pytest.raises(DatabaseNotMigrated):
        check_migrated(engine)
    upgrade_to_head(url)
    check_migrated(engine)
    engine.dispose()

"""tenants.queued_trainings/queued_generations and queued_cap: the queued-jobs cap kept by the database

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:00:00

Before this, every create locked the tenant's row (SELECT … FOR UPDATE) and counted its queued trainings and
generations while holding the lock until the commit, so one tenant's creates ran one at a time, each holding
the lock across a few round trips and the Python work between them (about 15x slower creates under load).

Now triggers keep ``tenants.queued_trainings`` and ``tenants.queued_generations`` equal to the tenant's queued
rows of each table: +1 when a row is inserted as queued (or comes back to ``queued``), -1 when it leaves
``queued`` or is deleted while queued. The insert trigger refuses a new queued job when the two together reach
``tenants.queued_cap`` (NULL: no cap; the gateway stores the tenant's effective cap there)
by raising ``krona_queue_full``, which the gateway answers with 429 queue_full.

On PostgreSQL the triggers are deferred constraint triggers: they run at COMMIT, so the tenant's row is locked
only for the commit itself, never across the create's round trips. Concurrent creates through any number of
gateway replicas still cannot pass the cap together: each commit updates the row under its lock and sees the
others' increments. On SQLite (one writer at a time) they are plain row triggers.

Additive: older code (0006) runs on this schema (it never sets ``queued_cap``, so nothing is refused for it),
so ``schema_compatibility`` is left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Each job table and the tenants column that counts its queued rows.
COUNTERS = {"trainings": "queued_trainings", "generations": "queued_generations"}
TOTAL = "(queued_trainings + queued_generations)"

PG_FUNCTIONS = """
CREATE FUNCTION krona_queued_add(tenant text, job_table text, delta integer, checked boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- ``checked``: a new queued job, refused when the tenant's queued jobs reached its cap.
    IF job_table = 'trainings' THEN
        UPDATE tenants SET queued_trainings = queued_trainings + delta WHERE id = tenant
           AND (NOT checked OR queued_cap IS NULL OR queued_trainings + queued_generations < queued_cap);
    ELSE
        UPDATE tenants SET queued_generations = queued_generations + delta WHERE id = tenant
           AND (NOT checked OR queued_cap IS NULL OR queued_trainings + queued_generations < queued_cap);
    END IF;
    IF NOT FOUND AND checked AND EXISTS (SELECT 1 FROM tenants WHERE id = tenant) THEN
        RAISE EXCEPTION 'krona_queue_full';
    END IF;
END $$;

CREATE FUNCTION krona_queued_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM krona_queued_add(NEW.tenant_id, TG_TABLE_NAME, 1, true);
    RETURN NULL;
END $$;

CREATE FUNCTION krona_queued_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'queued' THEN
        PERFORM krona_queued_add(OLD.tenant_id, TG_TABLE_NAME, -1, false);
    ELSE
        PERFORM krona_queued_add(NEW.tenant_id, TG_TABLE_NAME, 1, false);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION krona_queued_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM krona_queued_add(OLD.tenant_id, TG_TABLE_NAME, -1, false);
    RETURN NULL;
END $$;
"""

PG_TRIGGERS = """
CREATE CONSTRAINT TRIGGER krona_{table}_queued_insert AFTER INSERT ON {table}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'queued')
    EXECUTE FUNCTION krona_queued_insert();
CREATE CONSTRAINT TRIGGER krona_{table}_queued_update AFTER UPDATE OF status ON {table}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.status = 'queued') IS DISTINCT FROM (NEW.status = 'queued'))
    EXECUTE FUNCTION krona_queued_update();
CREATE CONSTRAINT TRIGGER krona_{table}_queued_delete AFTER DELETE ON {table}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status = 'queued')
    EXECUTE FUNCTION krona_queued_delete();
"""

SQLITE_TRIGGERS = (
    """CREATE TRIGGER krona_{table}_queued_insert AFTER INSERT ON {table} WHEN NEW.status = 'queued'
    BEGIN
        SELECT RAISE(ABORT, 'krona_queue_full') FROM tenants
         WHERE id = NEW.tenant_id AND queued_cap IS NOT NULL AND {total} >= queued_cap;
        UPDATE tenants SET {column} = {column} + 1 WHERE id = NEW.tenant_id;
    END""",
    """CREATE TRIGGER krona_{table}_queued_leave AFTER UPDATE OF status ON {table}
    WHEN OLD.status = 'queued' AND NEW.status <> 'queued'
    BEGIN
        UPDATE tenants SET {column} = {column} - 1 WHERE id = OLD.tenant_id;
    END""",
    """CREATE TRIGGER krona_{table}_queued_enter AFTER UPDATE OF status ON {table}
    WHEN OLD.status <> 'queued' AND NEW.status = 'queued'
    BEGIN
        UPDATE tenants SET {column} = {column} + 1 WHERE id = NEW.tenant_id;
    END""",
    """CREATE TRIGGER krona_{table}_queued_delete AFTER DELETE ON {table} WHEN OLD.status = 'queued'
    BEGIN
        UPDATE tenants SET {column} = {column} - 1 WHERE id = OLD.tenant_id;
    END""",
)


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        for column in COUNTERS.values():
            batch.add_column(sa.Column(column, sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("queued_cap", sa.Integer(), nullable=True))
    for table, column in COUNTERS.items():
        op.execute(
            f"UPDATE tenants SET {column} = "
            f"(SELECT count(*) FROM {table} WHERE {table}.tenant_id = tenants.id AND {table}.status = 'queued')"
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTIONS)
        for table in COUNTERS:
            op.execute(PG_TRIGGERS.format(table=table))
    else:
        for table, column in COUNTERS.items():
            for trigger in SQLITE_TRIGGERS:
                op.execute(trigger.format(table=table, column=column, total=TOTAL))


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table in COUNTERS:
        names = ("insert", "update", "delete") if postgres else ("insert", "leave", "enter", "delete")
        for name in names:
            op.execute(f"DROP TRIGGER krona_{table}_queued_{name}" + (f" ON {table}" if postgres else ""))
    if postgres:
        for function in ("insert()", "update()", "delete()", "add(text, text, integer, boolean)"):
            op.execute(f"DROP FUNCTION krona_queued_{function}")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("queued_cap")
        for column in reversed(COUNTERS.values()):
            batch.drop_column(column)

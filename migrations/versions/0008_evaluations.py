"""evaluations: an adapter's scoring as a job of the train queue, with the columns every job has

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 18:00:00

Until now an evaluation requested with ``POST /v1/adapters/{id}/evaluations`` kept its state and lease in
``adapters.evaluation`` (JSON, leases compared as ISO strings) and ran in message order on the train queue,
outside the tenant's caps, the fair scheduler and the usage records. It is now a row of ``evaluations`` with the
job columns trainings and generations have: the scheduler picks it among the train queue's jobs, the queued-jobs
triggers count it (``tenants.queued_evaluations``; the cap covers the three counters), and its work is charged
and recorded. A training with ``params.evaluate`` records its result here too.

Existing evaluations move from ``adapters.evaluation`` into rows (one per adapter; a running one goes back to
queued, its lease being in the JSON). ``adapters.evaluation`` stays, unused, for a later migration to drop.

Not additive in behaviour: code at 0007 would keep writing requests into ``adapters.evaluation`` that nothing
runs any more, so ``schema_compatibility.compatible_from`` becomes 0008 (code older than this refuses the schema:
upgrade gateways and workers together, migrate first).
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

COUNTERS = {"trainings": "queued_trainings", "generations": "queued_generations", "evaluations": "queued_evaluations"}
TOTAL = "(queued_trainings + queued_generations + queued_evaluations)"
OLD_TOTAL = "(queued_trainings + queued_generations)"

PG_ADD = """
CREATE OR REPLACE FUNCTION krona_queued_add(tenant text, job_table text, delta integer, checked boolean)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- ``checked``: a new queued job, refused when the tenant's queued jobs reached its cap.
    IF job_table = 'trainings' THEN
        UPDATE tenants SET queued_trainings = queued_trainings + delta WHERE id = tenant
           AND (NOT checked OR queued_cap IS NULL OR {total} < queued_cap);
    ELSIF job_table = 'generations' THEN
        UPDATE tenants SET queued_generations = queued_generations + delta WHERE id = tenant
           AND (NOT checked OR queued_cap IS NULL OR {total} < queued_cap);
    ELSE
        UPDATE tenants SET queued_evaluations = queued_evaluations + delta WHERE id = tenant
           AND (NOT checked OR queued_cap IS NULL OR {total} < queued_cap);
    END IF;
    IF NOT FOUND AND checked AND EXISTS (SELECT 1 FROM tenants WHERE id = tenant) THEN
        RAISE EXCEPTION 'krona_queue_full';
    END IF;
END $$;
"""

PG_OLD_ADD = """
CREATE OR REPLACE FUNCTION krona_queued_add(tenant text, job_table text, delta integer, checked boolean)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
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
"""

PG_TRIGGERS = """
CREATE CONSTRAINT TRIGGER krona_evaluations_queued_insert AFTER INSERT ON evaluations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'queued')
    EXECUTE FUNCTION krona_queued_insert();
CREATE CONSTRAINT TRIGGER krona_evaluations_queued_update AFTER UPDATE OF status ON evaluations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.status = 'queued') IS DISTINCT FROM (NEW.status = 'queued'))
    EXECUTE FUNCTION krona_queued_update();
CREATE CONSTRAINT TRIGGER krona_evaluations_queued_delete AFTER DELETE ON evaluations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.status = 'queued')
    EXECUTE FUNCTION krona_queued_delete();
"""

SQLITE_INSERT = """CREATE TRIGGER krona_{table}_queued_insert AFTER INSERT ON {table} WHEN NEW.status = 'queued'
    BEGIN
        SELECT RAISE(ABORT, 'krona_queue_full') FROM tenants
         WHERE id = NEW.tenant_id AND queued_cap IS NOT NULL AND {total} >= queued_cap;
        UPDATE tenants SET {column} = {column} + 1 WHERE id = NEW.tenant_id;
    END"""
SQLITE_OTHERS = (
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


def _job_columns() -> list[sa.Column]:
    """The columns every leased job has (shared/db/models.py: _Job)."""
    return [
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cost", sa.Float(), server_default="0", nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("webhook_delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("webhook_state", sa.String(length=16), nullable=True),
        sa.Column("webhook_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("webhook_next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("webhook_lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("webhook_last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("adapter_id", sa.String(length=32), nullable=False),
        sa.Column("base_model", sa.String(length=300), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("reference_keys", sa.JSON(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=True),
        *_job_columns(),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_evaluations_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_evaluations_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(op.f("ix_evaluations_status"), "evaluations", ["status"])
    op.create_index(op.f("ix_evaluations_tenant_id"), "evaluations", ["tenant_id"])
    op.create_index(op.f("ix_evaluations_webhook_state"), "evaluations", ["webhook_state"])
    op.create_index("ix_evaluations_status_tenant_created", "evaluations", ["status", "tenant_id", "created_at"])
    op.create_index("ix_evaluations_adapter_created", "evaluations", ["adapter_id", "created_at"])
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("queued_evaluations", sa.Integer(), nullable=False, server_default="0"))

    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    _move_evaluations(bind)
    if postgres:
        op.execute(PG_ADD.format(total=TOTAL))
        op.execute(PG_TRIGGERS)
    else:
        for table, column in COUNTERS.items():
            if table != "evaluations":
                op.execute(f"DROP TRIGGER krona_{table}_queued_insert")
            op.execute(SQLITE_INSERT.format(table=table, column=column, total=TOTAL))
            if table == "evaluations":
                for trigger in SQLITE_OTHERS:
                    op.execute(trigger.format(table=table, column=column))
    op.execute(
        "UPDATE tenants SET queued_evaluations = (SELECT count(*) FROM evaluations "
        "WHERE evaluations.tenant_id = tenants.id AND evaluations.status = 'queued')"
    )
    op.execute("UPDATE schema_compatibility SET compatible_from = '0008'")


def _move_evaluations(bind) -> None:
    """One row per adapter that has ``adapters.evaluation``; a running one goes back to queued."""
    from datetime import UTC, datetime
    from uuid import uuid4

    adapters = bind.execute(
        sa.text("SELECT id, tenant_id, base_model, evaluation FROM adapters WHERE evaluation IS NOT NULL")
    ).all()
    types = {"params": sa.JSON(), "reference_keys": sa.JSON(), "scores": sa.JSON(), "attempts": sa.Integer(),
             "cost": sa.Float(), "created_at": sa.DateTime(timezone=True), "updated_at": sa.DateTime(timezone=True),
             "finished_at": sa.DateTime(timezone=True), "enqueued_at": sa.DateTime(timezone=True)}  # fmt: skip
    names = ("id", "tenant_id", "adapter_id", "base_model", "params", "reference_keys", "scores", "status",
             "attempts", "cost", "error_code", "error_message", "created_at", "updated_at", "finished_at",
             "enqueued_at")  # fmt: skip
    table = sa.table("evaluations", *(sa.column(name, types.get(name, sa.String())) for name in names))
    now = datetime.now(UTC)
    rows = []
    for adapter_id, tenant_id, base_model, stored in adapters:
        state = json.loads(stored) if isinstance(stored, str) else dict(stored or {})
        if not state:
            continue
        status = {"running": "queued"}.get(state.get("status"), state.get("status") or "failed")
        scores = {k: state.get(k) for k in ("clip_i", "clip_t", "dino")}
        error = state.get("error") or {}
        params = {k: state.get(k) for k in ("prompts", "images_per_prompt", "steps", "class_noun", "identifier",
                                             "models", "reference_images")}  # fmt: skip
        ended = status in ("succeeded", "failed")
        rows.append(
            {
                "id": f"evl_{uuid4().hex[:24]}",
                "tenant_id": tenant_id,
                "adapter_id": adapter_id,
                "base_model": base_model,
                "params": params,
                "reference_keys": [] if ended else list(state.get("reference_keys") or []),
                "scores": scores if status == "succeeded" else None,
                "status": status,
                "attempts": 0,
                "cost": 0.0,
                "error_code": error.get("code"),
                "error_message": error.get("message"),
                "created_at": now,
                "updated_at": now,
                "finished_at": now if ended else None,
                "enqueued_at": None,  # the reaper sends the queued ones
            }
        )
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        for name in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER krona_evaluations_queued_{name} ON evaluations")
        op.execute(PG_OLD_ADD)
    else:
        # SQLite rebuilds ``tenants`` to drop a column, and a trigger that names it would fail the rename: drop
        # them all, and put 0007's back afterwards.
        for table in COUNTERS:
            for name in ("insert", "leave", "enter", "delete"):
                op.execute(f"DROP TRIGGER krona_{table}_queued_{name}")
    op.drop_table("evaluations")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("queued_evaluations")
    if not postgres:
        for table, column in COUNTERS.items():
            if table != "evaluations":
                op.execute(SQLITE_INSERT.format(table=table, column=column, total=OLD_TOTAL))
                for trigger in SQLITE_OTHERS:
                    op.execute(trigger.format(table=table, column=column))
    op.execute("UPDATE schema_compatibility SET compatible_from = '0003'")

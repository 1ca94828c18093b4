"""generations.cancel_requested, webhook_events on jobs, adapters.instance_prompt and identifier

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 20:00:00

For the API conventions of issue 21: a running generation can be canceled (its worker reads the flag, and the
generation answers `canceling` meanwhile); a job's webhook can name the events it wants (`webhook_events`, null:
all); an adapter keeps the instance prompt and identifier it was trained with (its evaluation uses them).
Additive (new nullable or defaulted columns): ``schema_compatibility`` is left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN, not Alembic's batch mode: on SQLite a batch may rebuild the table, and a rebuilt
    # table loses its triggers (the queued-jobs counters of migrations 0007 and 0008).
    op.add_column("generations", sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
    for table in ("generations", "trainings", "evaluations"):
        op.add_column(table, sa.Column("webhook_events", sa.JSON(), nullable=True))
    op.add_column("adapters", sa.Column("instance_prompt", sa.Text(), nullable=True))
    op.add_column("adapters", sa.Column("identifier", sa.String(length=100), nullable=True))


def downgrade() -> None:
    # ALTER TABLE DROP COLUMN (SQLite 3.35 and later), again without a rebuild that would drop the triggers.
    op.drop_column("adapters", "identifier")
    op.drop_column("adapters", "instance_prompt")
    for table in ("evaluations", "trainings", "generations"):
        op.drop_column(table, "webhook_events")
    op.drop_column("generations", "cancel_requested")

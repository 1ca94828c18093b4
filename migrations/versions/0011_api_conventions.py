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
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
    with op.batch_alter_table("trainings") as batch:
        batch.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("webhook_events", sa.JSON(), nullable=True))
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("instance_prompt", sa.Text(), nullable=True))
        batch.add_column(sa.Column("identifier", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("identifier")
        batch.drop_column("instance_prompt")
    for table in ("evaluations", "trainings"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("webhook_events")
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("webhook_events")
        batch.drop_column("cancel_requested")

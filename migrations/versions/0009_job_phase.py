"""trainings.phase and generations.phase: what a running job is doing (loading_model, class_images, training,
evaluating, uploading; generating)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 19:00:00

Clients showed a bar at 0/N while a worker loaded the model or made class images, and at 100% while it
evaluated. Additive (nullable columns): ``schema_compatibility`` is left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE, not a batch: a rebuilt SQLite table would lose the queued-jobs triggers (0007, 0008).
    for table in ("trainings", "generations"):
        op.add_column(table, sa.Column("phase", sa.String(length=32), nullable=True))


def downgrade() -> None:
    for table in ("trainings", "generations"):
        op.drop_column(table, "phase")

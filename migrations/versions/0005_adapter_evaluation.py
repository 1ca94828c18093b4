"""adapters.evaluation: CLIP-I/CLIP-T/DINO scores and the evaluation job's state (JSON, null: never evaluated)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 13:10:00

Additive (a nullable column): code at 0004 runs on this schema, so ``schema_compatibility`` is left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("evaluation")

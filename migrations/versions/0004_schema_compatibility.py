"""schema_compatibility: the oldest code revision that can run on this schema (for rolling upgrades and rollbacks)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00

Code whose head is older than the database's revision accepts the database when ``compatible_from`` is a
revision it has (shared/db/session.py ``check_migrated``). An additive migration (new tables, nullable or
defaulted columns, indexes) leaves the value alone, so the pods of the previous release keep running during
a rollout. A migration that older code cannot run on (a dropped or renamed column, a changed meaning) sets
it to its own revision in ``upgrade`` and puts the previous value back in ``downgrade``.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "schema_compatibility",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("compatible_from", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schema_compatibility")),
    )
    # Code at 0003 runs on this schema (this migration only adds this table).
    op.bulk_insert(table, [{"id": 1, "compatible_from": "0003"}])


def downgrade() -> None:
    op.drop_table("schema_compatibility")

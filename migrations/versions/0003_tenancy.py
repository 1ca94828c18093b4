"""multi-tenant platform: fair-scheduling counters and job costs, per-tenant weight and limits, usage records,
key roles, names, last use and rate buckets, retention marks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JOB_TABLES = ("trainings", "generations")


def upgrade() -> None:
    op.create_table(
        "tenant_service",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("queue", sa.String(length=16), nullable=False),
        sa.Column("counter", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_service_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "queue", name=op.f("pk_tenant_service")),
    )
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("worker_seconds", sa.Float(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("pixels", sa.BigInteger(), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_usage_records_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
    )
    op.create_index("ix_usage_records_tenant_day", "usage_records", ["tenant_id", "day"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), server_default="tenant", nullable=False))
        batch_op.add_column(sa.Column("name", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rate_tokens", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rate_checked", sa.Float(), nullable=True))
        batch_op.alter_column("tenant_id", existing_type=sa.String(length=32), nullable=True)

    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("limits", sa.JSON(), server_default=sa.text("'{}'"), nullable=False))

    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("images_deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("images_expired_at", sa.DateTime(timezone=True), nullable=True))
    for table in JOB_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("cost", sa.Float(), server_default="0", nullable=False))
        # The fair scheduler's question: which tenants have queued jobs, and their oldest.
        op.create_index(f"ix_{table}_status_tenant_created", table, ["status", "tenant_id", "created_at"])


def downgrade() -> None:
    for table in JOB_TABLES:
        op.drop_index(f"ix_{table}_status_tenant_created", table_name=table)
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("cost")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("images_expired_at")
    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.drop_column("images_deleted_at")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("limits")
        batch_op.drop_column("weight")
    op.execute("DELETE FROM api_keys WHERE tenant_id IS NULL")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.alter_column("tenant_id", existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_column("rate_checked")
        batch_op.drop_column("rate_tokens")
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("name")
        batch_op.drop_column("role")
    op.drop_index("ix_usage_records_tenant_day", table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_table("tenant_service")

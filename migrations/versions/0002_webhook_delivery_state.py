"""webhook delivery state on jobs; a signing secret per tenant

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:00:00
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JOB_TABLES = ("trainings", "generations")


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_secret", sa.String(length=64), nullable=True))
    tenants = sa.table("tenants", sa.column("id", sa.String), sa.column("webhook_secret", sa.String))
    connection = op.get_bind()
    for (tenant_id,) in connection.execute(sa.select(tenants.c.id)).all():
        secret = "whsec_" + secrets.token_urlsafe(32)
        connection.execute(tenants.update().where(tenants.c.id == tenant_id).values(webhook_secret=secret))
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.alter_column("webhook_secret", existing_type=sa.String(length=64), nullable=False)

    for table in JOB_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("webhook_state", sa.String(length=16), nullable=True))
            batch_op.add_column(sa.Column("webhook_attempts", sa.Integer(), server_default="0", nullable=False))
            batch_op.add_column(sa.Column("webhook_next_attempt_at", sa.DateTime(timezone=True), nullable=True))
            batch_op.add_column(sa.Column("webhook_lease_expires_at", sa.DateTime(timezone=True), nullable=True))
            batch_op.add_column(sa.Column("webhook_last_error", sa.Text(), nullable=True))
            batch_op.create_index(batch_op.f(f"ix_{table}_webhook_state"), ["webhook_state"], unique=False)
        jobs = sa.table(
            table,
            sa.column("webhook_url", sa.Text),
            sa.column("webhook_delivered_at", sa.DateTime),
            sa.column("webhook_state", sa.String),
        )
        connection.execute(
            jobs.update()
            .where(jobs.c.webhook_url.is_not(None), jobs.c.webhook_delivered_at.is_not(None))
            .values(webhook_state="delivered")
        )
        connection.execute(
            jobs.update()
            .where(jobs.c.webhook_url.is_not(None), jobs.c.webhook_delivered_at.is_(None))
            .values(webhook_state="waiting")
        )


def downgrade() -> None:
    for table in JOB_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_webhook_state"))
            for column in (
                "webhook_last_error",
                "webhook_lease_expires_at",
                "webhook_next_attempt_at",
                "webhook_attempts",
                "webhook_state",
            ):
                batch_op.drop_column(column)
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("webhook_secret")

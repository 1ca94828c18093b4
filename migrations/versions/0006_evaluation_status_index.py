"""index on adapters.evaluation's status: the train queue's autoscaler counts queued and running evaluations

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 14:00:00

KEDA's PostgreSQL scaler of the train workers (deploy/k8s/base/keda.yaml) counts the train queue's jobs:
trainings and standalone adapter evaluations (krona.evaluate) that are queued or running. This expression
index answers the evaluations' half without reading every adapter row. PostgreSQL only: KEDA reads
PostgreSQL, and the embedded SQLite database has no autoscaler. Additive: ``schema_compatibility`` is left
alone.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_adapters_evaluation_status ON adapters ((evaluation ->> 'status'))")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_adapters_evaluation_status")

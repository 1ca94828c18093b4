"""partial indexes over the tenants with queued jobs of each queue: the fair scheduler reads only those

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 10:00:00

The scheduler's pick (shared/scheduler.py) used to group every queued job by tenant and load every waiting
tenant's limits on each claim, so a claim cost grew with the queue (22 ms at 1,000 queued generations, 42 ms at
50,000, 500 tenants). It now starts from the tenants whose queued counters (``tenants.queued_*``, kept by the
triggers of migrations 0007 and 0008) say they wait, in fair order, and reads only the first ones' oldest job.
These partial indexes hold exactly the waiting tenants of each queue (infer: generations; train: trainings and
evaluations), so that finding them does not read the idle ones. Their predicates are the ones the scheduler
writes (with a literal 0), which both PostgreSQL and SQLite need to match a partial index.

Cost: an update of a queued counter can no longer be a HOT update on PostgreSQL (an index's predicate reads the
column), so each one also writes the tenants' index entries: microseconds, on a small table.

Additive: older code (0009) runs on this schema, so ``schema_compatibility`` is left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Index name -> the predicate: the tenants with queued jobs of the queue (shared/scheduler.py: _waiting).
WAITING = {
    "ix_tenants_waiting_infer": "queued_generations > 0",
    "ix_tenants_waiting_train": "queued_trainings > 0 OR queued_evaluations > 0",
}


def upgrade() -> None:
    for name, predicate in WAITING.items():
        op.create_index(name, "tenants", ["id"], postgresql_where=sa.text(predicate), sqlite_where=sa.text(predicate))


def downgrade() -> None:
    for name in WAITING:
        op.drop_index(name, table_name="tenants")

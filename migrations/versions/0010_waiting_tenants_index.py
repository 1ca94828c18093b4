"""partial indexes for the fair scheduler: the tenants with queued jobs of each queue, and queued generations by size

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 10:00:00

The scheduler's pick (shared/scheduler.py) grouped every queued job by tenant and loaded every waiting tenant's
limits on each claim, so a claim cost grew with the queue (22 ms at 1,000 queued generations, 42 ms at 50,000,
500 tenants). It now starts from the tenants whose queued counters (``tenants.queued_*``, kept by the triggers of
migrations 0007 and 0008) say they wait, in fair order, and reads only the first ones' oldest job:

- ``ix_tenants_waiting_infer`` / ``ix_tenants_waiting_train``: exactly the waiting tenants of each queue (infer:
  generations; train: trainings and evaluations), read as an index-only scan, so that finding them reads neither
  the idle tenants nor the tenants' rows (which every counter update rewrites, so they spread over many pages);
- ``ix_generations_queued_size``: queued generations by width and height, for the inference gatherer's
  compatibility filters (same size as the batch's first request): when the first tenants in fair order have no
  compatible job, the tenants that have one are found from the jobs' side through it, not by reading every
  queued job.

Their predicates are the ones the scheduler writes, with literal constants, which both PostgreSQL and SQLite need
to match a partial index. Cost: an update of a tenant's queued counter can no longer be a HOT update on
PostgreSQL (an index's predicate reads the column), so it also writes the tenants' index entries (microseconds, on
a small table); a queued generation adds one index entry.

Additive: older code (0009) runs on this schema, so ``schema_compatibility`` is left alone.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Index name -> (table, columns, predicate); shared/scheduler.py writes the same predicates (_waiting, _QUEUED).
INDEXES = {
    "ix_tenants_waiting_infer": ("tenants", ["id"], "queued_generations > 0"),
    "ix_tenants_waiting_train": ("tenants", ["id"], "queued_trainings > 0 OR queued_evaluations > 0"),
    "ix_generations_queued_size": ("generations", ["width", "height", "tenant_id"], "status = 'queued'"),
}


def upgrade() -> None:
    for name, (table, columns, predicate) in INDEXES.items():
        where = sa.text(predicate)
        op.create_index(name, table, columns, postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    for name, (table, _, _) in INDEXES.items():
        op.drop_index(name, table_name=table)

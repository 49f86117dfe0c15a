"""Every job has a memory estimate; the samples table is named for what its rows are.

- `scheduler_jobs.memory_estimate`: a database made before the column existed lacks it (the old
  start-up added it, nullable, on the fly), so it is added where missing; NULL (SQL or JSON) turns
  into {} and the column becomes NOT NULL, so a reader needs no fallback.
- `scheduler_job_metrics` -> `scheduler_metric_samples`: a row is one metrics sample of a job.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

jobs = sa.table("scheduler_jobs", sa.column("memory_estimate", sa.JSON))


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("scheduler_jobs")}
    if "memory_estimate" not in columns:
        op.add_column("scheduler_jobs", sa.Column("memory_estimate", sa.JSON, nullable=True))
    estimate = jobs.c.memory_estimate
    op.execute(
        jobs.update()
        .where(sa.or_(estimate.is_(None), sa.cast(estimate, sa.Text) == "null"))
        .values(memory_estimate={})
    )
    with op.batch_alter_table("scheduler_jobs") as batch:
        batch.alter_column("memory_estimate", existing_type=sa.JSON, nullable=False)
    op.rename_table("scheduler_job_metrics", "scheduler_metric_samples")


def downgrade() -> None:
    op.rename_table("scheduler_metric_samples", "scheduler_job_metrics")
    with op.batch_alter_table("scheduler_jobs") as batch:
        batch.alter_column("memory_estimate", existing_type=sa.JSON, nullable=True)

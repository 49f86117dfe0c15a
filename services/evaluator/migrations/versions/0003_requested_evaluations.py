"""Evaluations on demand (CreateEvaluation) and per-metric confidence intervals.

- `evaluator_evaluations` gains `request` (what CreateEvaluation asked, resolved; {} for a job's
  evaluation) and `comparisons` (per metric: base, tuned, difference and its paired bootstrap
  interval; [] for the rows made before).
- `evaluator_datasets` and `evaluator_model_versions`: the tenants' dataset versions and model
  versions as their events told, to resolve the names a request gives.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE = "evaluator_evaluations"


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("request", sa.JSON, nullable=True))
        batch.add_column(sa.Column("comparisons", sa.JSON, nullable=True))
    table = sa.table(TABLE, sa.column("request", sa.JSON), sa.column("comparisons", sa.JSON))
    op.get_bind().execute(table.update().values(request={}, comparisons=[]))
    with op.batch_alter_table(TABLE) as batch:
        batch.alter_column("request", existing_type=sa.JSON, nullable=False)
        batch.alter_column("comparisons", existing_type=sa.JSON, nullable=False)
    op.create_table(
        "evaluator_datasets",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("dataset_id", sa.String(256), primary_key=True),
        sa.Column("artifacts", sa.JSON, nullable=False),
    )
    op.create_table(
        "evaluator_model_versions",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("model_name", sa.String(256), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("job_id", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("evaluator_model_versions")
    op.drop_table("evaluator_datasets")
    # requested evaluations have no job to re-run from: they go with the columns
    table = sa.table(TABLE, sa.column("trigger", sa.String))
    op.get_bind().execute(table.delete().where(table.c.trigger.like("request:%")))
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("comparisons")
        batch.drop_column("request")

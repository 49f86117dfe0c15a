"""The scheduler's schema as `create_all` made it before migrations (commit 030388d): a database
from then is stamped at this revision and upgraded from here.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scheduler_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("dataset_id", sa.String(256), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(256), nullable=True),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("dataset_artifacts", sa.JSON, nullable=False),
        sa.Column("worker_id", sa.String(256), nullable=False),
        sa.Column("assigned_at", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("artifacts", sa.JSON, nullable=False),
        sa.Column("memory_estimate", sa.JSON, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.UniqueConstraint("tenant", "idempotency_key", name="scheduler_jobs_idempotency"),
    )
    op.create_index("scheduler_jobs_tenant_status", "scheduler_jobs", ["tenant", "status"])
    op.create_index("scheduler_jobs_status", "scheduler_jobs", ["status"])
    op.create_table(
        "scheduler_job_metrics",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("step", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "scheduler_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scheduler_outbox")
    op.drop_table("scheduler_job_metrics")
    op.drop_index("scheduler_jobs_status", table_name="scheduler_jobs")
    op.drop_index("scheduler_jobs_tenant_status", table_name="scheduler_jobs")
    op.drop_table("scheduler_jobs")

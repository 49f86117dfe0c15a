"""The evaluator's schema as `create_all` made it before migrations: one `evaluations` table.

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
        "evaluations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("job", sa.JSON, nullable=False),
        sa.Column("base_metrics", sa.JSON, nullable=False),
        sa.Column("tuned_metrics", sa.JSON, nullable=False),
        sa.Column("report_key", sa.String(512), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("announced", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("job_id", "trigger", name="uq_evaluations_job_trigger"),
    )
    for column in ("job_id", "tenant", "status"):
        op.create_index(f"ix_evaluations_{column}", "evaluations", [column])


def downgrade() -> None:
    op.drop_table("evaluations")

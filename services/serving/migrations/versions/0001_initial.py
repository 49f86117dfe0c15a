"""The serving service's first schema: its view of the registry, deployments, outbox.

Revision ID: 0001
Revises:
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
        "serving_jobs",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("checkpoint_key", sa.String(1024), nullable=False),
    )
    op.create_table(
        "serving_versions",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("model_name", sa.String(256), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
    )
    op.create_table(
        "serving_deployments",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("follows", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "serving_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    for table in ("serving_outbox", "serving_deployments", "serving_versions", "serving_jobs"):
        op.drop_table(table)

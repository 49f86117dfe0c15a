"""Promotion requests (filed with governance, each with its last decision) and the stages each
tenant's policy gates.

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


def upgrade() -> None:
    op.create_table(
        "registry_promotions",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("from_stage", sa.String(16), nullable=False),
        sa.Column("justification", sa.Text, nullable=False),
        sa.Column("requester", sa.String(255), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("unmet", sa.JSON, nullable=False),
        sa.Column("policy_version", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(256), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_registry_promotions_version", "registry_promotions",
                    ["tenant", "model_name", "version"])
    op.create_table(
        "registry_policy_gates",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("policy_version", sa.Integer, nullable=False),
        sa.Column("gated_stages", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_policy_gates")
    op.drop_index("ix_registry_promotions_version", table_name="registry_promotions")
    op.drop_table("registry_promotions")

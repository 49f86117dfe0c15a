"""Promotion policies (every version of each tenant's policy), the promotion requests governance
decided on, and their approvals.

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


def upgrade() -> None:
    op.create_table(
        "governance_policies",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("yaml", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("author", sa.String(255), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "governance_promotions",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("ref", sa.String(300), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("requester", sa.String(255), nullable=False),
        sa.Column("facts", sa.JSON, nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("policy_version", sa.Integer, nullable=False),
        sa.Column("verdicts", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("expires_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_governance_promotions_tenant", "governance_promotions", ["tenant"])
    op.create_table(
        "governance_approvals",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("approver", sa.String(255), primary_key=True),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("time", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("governance_approvals")
    op.drop_index("ix_governance_promotions_tenant", table_name="governance_promotions")
    op.drop_table("governance_promotions")
    op.drop_table("governance_policies")

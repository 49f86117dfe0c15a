"""Governance's schema as `create_all` made it before migrations (commit 030388d): the audit log
and the API keys, under their names of then.

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

AUDIT_INDEXED = ("event_type", "entity", "tenant")


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(128), nullable=False, unique=True),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("entity", sa.String(255), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("time", sa.String(40), nullable=False),
        sa.Column("data_json", sa.Text, nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    for column in AUDIT_INDEXED:
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("revoked_at", sa.String(40)),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    for column in AUDIT_INDEXED:
        op.drop_index(f"ix_audit_log_{column}", table_name="audit_log")
    op.drop_table("audit_log")

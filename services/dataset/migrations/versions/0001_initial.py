"""The dataset service's schema as `create_all` made it before migrations (commit 030388d).

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
        "datasets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("num_rows", sa.BigInteger, nullable=False),
        sa.Column("train_rows", sa.BigInteger, nullable=False),
        sa.Column("validation_rows", sa.BigInteger, nullable=False),
        sa.Column("test_rows", sa.BigInteger, nullable=False),
        sa.Column("artifacts", sa.JSON, nullable=False),
        sa.Column("split_sha256", sa.JSON, nullable=False),
        sa.Column("validation_fraction", sa.Float, nullable=False),
        sa.Column("test_fraction", sa.Float, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("parent_id", sa.String(32), nullable=False),
        sa.Column("transformation", sa.Text, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("warnings", sa.JSON, nullable=False),
        sa.Column("source_schema", sa.String(32), nullable=False),
        sa.Column("source_format", sa.String(16), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(256)),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("announced", sa.Boolean, nullable=False),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_datasets_tenant_idempotency"),
        sa.UniqueConstraint("tenant", "name", "version", name="uq_datasets_tenant_name_version"),
    )
    op.create_index("ix_datasets_tenant_name", "datasets", ["tenant", "name"])


def downgrade() -> None:
    op.drop_table("datasets")

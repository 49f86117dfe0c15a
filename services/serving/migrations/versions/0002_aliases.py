"""The registry's aliases as serving heard of them, and deployments that follow one (an alias
name is up to 64 characters: `follows` widens from 16).

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
        "serving_aliases",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("model_name", sa.String(256), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    with op.batch_alter_table("serving_deployments") as batch:
        batch.alter_column("follows", existing_type=sa.String(16), type_=sa.String(64),
                           existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("serving_deployments") as batch:
        batch.alter_column("follows", existing_type=sa.String(64), type_=sa.String(16),
                           existing_nullable=False)
    op.drop_table("serving_aliases")

"""Registry depth: each model's aliases (the version each names); tags and descriptions on
models and versions; versions deleted with retention (marked, not erased).

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
        "registry_aliases",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("model_name", sa.String(256), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )


    for table in ("registry_models", "registry_versions"):
        op.add_column(table, sa.Column("tags", sa.JSON, nullable=False, server_default="{}"))
        op.add_column(table, sa.Column("description", sa.Text, nullable=False,
                                       server_default=""))
    op.add_column("registry_versions", sa.Column("deleted_at", sa.String(40), nullable=False,
                                                 server_default=""))
    op.add_column("registry_versions", sa.Column("deleted_by", sa.String(256), nullable=False,
                                                 server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("registry_versions") as batch:
        for column in ("deleted_by", "deleted_at", "description", "tags"):
            batch.drop_column(column)
    with op.batch_alter_table("registry_models") as batch:
        for column in ("description", "tags"):
            batch.drop_column(column)
    op.drop_table("registry_aliases")

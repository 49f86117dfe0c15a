"""Governance's tables take the `governance_` prefix (the services may share one database), and
key events go through a transactional outbox (`governance_outbox`) instead of being published
after the commit.

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

RENAMED = {"audit_log": "governance_audit_log", "api_keys": "governance_api_keys"}
AUDIT_INDEXED = ("event_type", "entity", "tenant")
# PostgreSQL named these constraints after their tables (SQLite keeps them unnamed).
PG_CONSTRAINTS = {"audit_log": ("pkey", "event_id_key"), "api_keys": ("pkey", "key_hash_key")}


def upgrade() -> None:
    for legacy, new in RENAMED.items():
        op.rename_table(legacy, new)
        _rename_pg_constraints(legacy, new, PG_CONSTRAINTS[legacy])
    _rename_audit_indexes("audit_log", "governance_audit_log")
    op.create_table(
        "governance_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("governance_outbox")
    for legacy, new in RENAMED.items():
        op.rename_table(new, legacy)
        _rename_pg_constraints(new, legacy, PG_CONSTRAINTS[legacy])
    _rename_audit_indexes("governance_audit_log", "audit_log")


def _rename_audit_indexes(old_table: str, new_table: str) -> None:
    """The audit log's indexes are named after their table: named again once the table has its
    new name (dropped and made again: SQLite cannot rename an index)."""
    for column in AUDIT_INDEXED:
        op.drop_index(f"ix_{old_table}_{column}", table_name=new_table)
        op.create_index(f"ix_{new_table}_{column}", new_table, [column])


def _rename_pg_constraints(old_table: str, new_table: str, suffixes: tuple[str, ...]) -> None:
    """On PostgreSQL, name the key constraints of a renamed table after its new name, as a
    database made with that name has them."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for suffix in suffixes:
        op.execute(f"ALTER TABLE {new_table} RENAME CONSTRAINT {old_table}_{suffix} "
                   f"TO {new_table}_{suffix}")

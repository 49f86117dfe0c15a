"""Every job keeps the history of its attempts (`scheduler_jobs.attempts`, core.Attempt records);
jobs made before have none recorded: [].

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

jobs = sa.table("scheduler_jobs", sa.column("attempts", sa.JSON))


def upgrade() -> None:
    op.add_column("scheduler_jobs", sa.Column("attempts", sa.JSON, nullable=True))
    op.execute(jobs.update().values(attempts=[]))
    with op.batch_alter_table("scheduler_jobs") as batch:
        batch.alter_column("attempts", existing_type=sa.JSON, nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("scheduler_jobs") as batch:
        batch.drop_column("attempts")

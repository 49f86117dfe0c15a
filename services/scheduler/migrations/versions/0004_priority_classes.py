"""Priority classes replace the free priority int: `scheduler_jobs.priority` now holds a class's
rank (0 low, 1 normal, 2 high, 3 urgent). Jobs made before, whatever int they carried, become
normal: the old ints were not bounded by role, so none of them earns a higher class.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

jobs = sa.table("scheduler_jobs", sa.column("priority", sa.Integer))
NORMAL = 1


def upgrade() -> None:
    op.execute(jobs.update().values(priority=NORMAL))


def downgrade() -> None:
    pass  # the ranks are valid ints for the old schema

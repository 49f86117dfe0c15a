"""The outbox replaces the `announced` flag; the table takes the `dataset_` prefix.

- `dataset_outbox`: the events a use case announces, written in the transaction of the state
  they announce (published by the service, then deleted).
- `datasets` becomes `dataset_datasets`, without `announced`. A version whose DatasetRegistered
  was never published (announced false: stored just before a crash, or while NATS was down)
  gets it queued in the outbox here, rebuilt from its row (every field of the event is a column;
  the trace it was made in was never stored, so it starts a new one), so the next start
  publishes it: nothing announced is lost.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from llmstudio.events import DatasetRegistered, make_envelope
from llmstudio.outbox import now_iso

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD, NEW, OUTBOX = "datasets", "dataset_datasets", "dataset_outbox"
# the columns both shapes share; `announced` came last
SHARED = ("id", "tenant", "name", "sha256", "format", "num_rows", "train_rows",
          "validation_rows", "test_rows", "artifacts", "split_sha256", "validation_fraction",
          "test_fraction", "seed", "version", "parent_id", "transformation", "status",
          "warnings", "source_schema", "source_format", "description", "created_at",
          "created_by", "idempotency_key", "request_sha256")


def _columns(announced: bool) -> list[sa.Column]:
    return [
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
        *([sa.Column("announced", sa.Boolean, nullable=False)] if announced else []),
    ]


def _create_datasets(name: str, *, announced: bool) -> sa.Table:
    table = op.create_table(
        name, *_columns(announced),
        sa.UniqueConstraint("tenant", "idempotency_key", name=f"uq_{name}_tenant_idempotency"),
        sa.UniqueConstraint("tenant", "name", "version", name=f"uq_{name}_tenant_name_version"),
    )
    op.create_index(f"ix_{name}_tenant_name", name, ["tenant", "name"])
    return table


def _table(name: str, *, announced: bool) -> sa.Table:
    """`name` as a plain Core table (for reading and copying rows), not created."""
    return sa.Table(name, sa.MetaData(), *_columns(announced))


def _registered(row) -> DatasetRegistered:
    return DatasetRegistered(
        dataset_id=row.id, name=row.name, sha256=row.sha256, format=row.format,
        num_rows=row.num_rows, train_rows=row.train_rows, validation_rows=row.validation_rows,
        artifacts=row.artifacts, version=row.version, parent_id=row.parent_id,
        transformation=row.transformation,
    )


def upgrade() -> None:
    outbox = op.create_table(
        OUTBOX,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("envelope", sa.Text, nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )
    conn = op.get_bind()
    old = _table(OLD, announced=True)
    unannounced = sa.select(old).where(old.c.announced.is_(False)).order_by(
        old.c.created_at, old.c.id)
    for row in conn.execute(unannounced).all():
        data = _registered(row)
        env = make_envelope(data, source="dataset", tenant=row.tenant, actor=row.created_by)
        conn.execute(outbox.insert().values(
            subject=data.subject(), envelope=env.model_dump_json(), traceparent="",
            created_at=now_iso(),
        ))
    new = _create_datasets(NEW, announced=False)
    conn.execute(new.insert().from_select(SHARED, sa.select(*(old.c[c] for c in SHARED))))
    op.drop_table(OLD)


def downgrade() -> None:
    """Back to the flag: a version whose DatasetRegistered is still in the outbox is marked
    unannounced (the old code publishes it at start); other events still queued there (a job's
    DatasetValidated/DatasetRejected, an upload's DatasetRejected) have no row to mark and are
    dropped with the outbox."""
    conn = op.get_bind()
    new, outbox = _table(NEW, announced=False), sa.table(OUTBOX, sa.column("envelope"))
    old = _create_datasets(OLD, announced=True)
    conn.execute(old.insert().from_select(
        (*SHARED, "announced"), sa.select(*(new.c[c] for c in SHARED), sa.true())))
    envelopes = [json.loads(env) for env in conn.execute(sa.select(outbox.c.envelope)).scalars()]
    pending = [env["data"]["dataset_id"] for env in envelopes
               if env["type"] == DatasetRegistered.TYPE]
    if pending:
        conn.execute(old.update().where(old.c.id.in_(pending)).values(announced=False))
    op.drop_table(NEW)
    op.drop_table(OUTBOX)

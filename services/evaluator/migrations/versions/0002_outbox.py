"""The outbox replaces the `announced` flag; the table takes the `evaluator_` prefix.

- `evaluator_outbox`: the events a use case announces, written in the transaction of the state
  they announce (published by the service, then deleted).
- `evaluations` becomes `evaluator_evaluations`, without `announced`. A finished evaluation whose
  event was never published (announced false) gets its EvalCompleted / EvalFailed queued in the
  outbox here, in the job's trace, so the next start publishes it: nothing announced is lost.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from llmstudio.events import EvalCompleted, EvalFailed, EventData, make_envelope
from llmstudio.outbox import now_iso

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD, NEW, OUTBOX = "evaluations", "evaluator_evaluations", "evaluator_outbox"
# the columns both shapes share; `announced` came before the timestamps
SHARED = ("id", "job_id", "tenant", "trigger", "status", "actor", "traceparent", "job",
          "base_metrics", "tuned_metrics", "report_key", "error", "created_at", "updated_at")


def _columns(announced: bool) -> list[sa.Column]:
    return [
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("job", sa.JSON, nullable=False),
        sa.Column("base_metrics", sa.JSON, nullable=False),
        sa.Column("tuned_metrics", sa.JSON, nullable=False),
        sa.Column("report_key", sa.String(512), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        *([sa.Column("announced", sa.Boolean, nullable=False)] if announced else []),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _create_evaluations(name: str, *, announced: bool) -> sa.Table:
    table = op.create_table(
        name, *_columns(announced),
        sa.UniqueConstraint("job_id", "trigger", name=f"uq_{name}_job_trigger"),
    )
    for column in ("job_id", "tenant", "status"):
        op.create_index(f"ix_{name}_{column}", name, [column])
    return table


def _table(name: str, *, announced: bool) -> sa.Table:
    """`name` as a plain Core table (for reading and copying rows), not created."""
    return sa.Table(name, sa.MetaData(), *_columns(announced))


def _outcome(row) -> EventData:
    if row.status == "completed":
        return EvalCompleted(
            evaluation_id=row.id, job_id=row.job_id, model_name=row.job.get("model_name", ""),
            base_metrics=row.base_metrics, tuned_metrics=row.tuned_metrics,
            report_key=row.report_key,
        )
    return EvalFailed(evaluation_id=row.id, job_id=row.job_id, reason=row.error)


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
    unannounced = sa.select(old).where(
        old.c.announced.is_(False), old.c.status.in_(("completed", "failed"))
    ).order_by(old.c.updated_at)
    for row in conn.execute(unannounced).all():
        data = _outcome(row)
        env = make_envelope(data, source="evaluator", tenant=row.tenant, actor=row.actor)
        conn.execute(outbox.insert().values(
            subject=data.subject(), envelope=env.model_dump_json(),
            traceparent=row.traceparent, created_at=now_iso(),
        ))
    new = _create_evaluations(NEW, announced=False)
    conn.execute(new.insert().from_select(SHARED, sa.select(*(old.c[c] for c in SHARED))))
    op.drop_table(OLD)


def downgrade() -> None:
    conn = op.get_bind()
    new, outbox = _table(NEW, announced=False), sa.table(OUTBOX, sa.column("envelope"))
    old = _create_evaluations(OLD, announced=True)
    # announced: finished, and its event no longer in the outbox
    conn.execute(old.insert().from_select(
        (*SHARED, "announced"),
        sa.select(*(new.c[c] for c in SHARED), new.c.status != "running")))
    pending = [json.loads(env)["data"]["evaluation_id"]
               for env in conn.execute(sa.select(outbox.c.envelope)).scalars()]
    if pending:
        conn.execute(old.update().where(old.c.id.in_(pending)).values(announced=False))
    op.drop_table(NEW)
    op.drop_table(OUTBOX)

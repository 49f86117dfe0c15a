"""Evaluations in the evaluator's own database (SQLite by default, PostgreSQL too)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from llmstudio.db import make_engine

from .core import COMPLETED, FAILED, RUNNING, Evaluation

metadata = MetaData()

evaluations = Table(
    "evaluations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("job_id", String(128), nullable=False, index=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("trigger", String(64), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("actor", String(256), nullable=False, default=""),
    Column("traceparent", String(128), nullable=False, default=""),
    Column("job", JSON, nullable=False),
    Column("base_metrics", JSON, nullable=False, default=dict),
    Column("tuned_metrics", JSON, nullable=False, default=dict),
    Column("report_key", String(512), nullable=False, default=""),
    Column("error", Text, nullable=False, default=""),
    Column("announced", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Idempotency: a redelivered or re-published trigger finds the row already there, and two
    # replicas racing on the same event cannot both insert.
    UniqueConstraint("job_id", "trigger", name="uq_evaluations_job_trigger"),
)


def _now() -> datetime:
    return datetime.now(UTC)


def _from_row(row) -> Evaluation:
    created = row.created_at
    if created.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
        created = created.replace(tzinfo=UTC)
    return Evaluation(
        id=row.id, job_id=row.job_id, tenant=row.tenant, job=row.job, actor=row.actor,
        traceparent=row.traceparent, trigger=row.trigger, status=row.status,
        base_metrics=row.base_metrics, tuned_metrics=row.tuned_metrics,
        report_key=row.report_key, error=row.error, announced=row.announced, created_at=created,
    )


class EvaluationStore:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        metadata.create_all(self.engine)

    def create(self, ev: Evaluation) -> bool:
        """Insert `ev`; False if its job already has an evaluation for the same trigger."""
        values = {
            "id": ev.id, "job_id": ev.job_id, "tenant": ev.tenant, "trigger": ev.trigger,
            "status": ev.status, "actor": ev.actor, "traceparent": ev.traceparent, "job": ev.job,
            "base_metrics": ev.base_metrics, "tuned_metrics": ev.tuned_metrics,
            "report_key": ev.report_key, "error": ev.error, "announced": ev.announced,
            "created_at": ev.created_at, "updated_at": ev.created_at,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(evaluations).values(**values))
        except IntegrityError:
            return False
        return True

    def get(self, evaluation_id: str, tenant: str) -> Evaluation | None:
        q = select(evaluations).where(
            evaluations.c.id == evaluation_id, evaluations.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return _from_row(row) if row else None

    def list(self, tenant: str, job_id: str = "") -> list[Evaluation]:
        q = select(evaluations).where(evaluations.c.tenant == tenant)
        if job_id:
            q = q.where(evaluations.c.job_id == job_id)
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(evaluations.c.created_at, evaluations.c.id)).all()
        return [_from_row(r) for r in rows]

    def unfinished(self) -> list[Evaluation]:
        """Evaluations a previous process left running, or finished but never announced."""
        q = select(evaluations).where(
            (evaluations.c.status == RUNNING) | (evaluations.c.announced.is_(False)))
        with self.engine.connect() as conn:
            return [_from_row(r) for r in conn.execute(q.order_by(evaluations.c.created_at)).all()]

    def complete(self, evaluation_id: str, base: dict, tuned: dict, report_key: str) -> None:
        self._set(evaluation_id, status=COMPLETED, base_metrics=base, tuned_metrics=tuned,
                  report_key=report_key, error="")

    def fail(self, evaluation_id: str, error: str) -> None:
        self._set(evaluation_id, status=FAILED, error=error)

    def mark_announced(self, evaluation_id: str) -> None:
        self._set(evaluation_id, announced=True)

    def _set(self, evaluation_id: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(evaluations).where(evaluations.c.id == evaluation_id)
                         .values(**values, updated_at=_now()))

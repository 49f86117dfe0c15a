"""Evaluations in the evaluator's own database (SQLite by default, PostgreSQL too), with the
outbox of the events that announce them. The schema is made by the Alembic scripts in
migrations/; the tables here are what their head revision makes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    or_,
    select,
)

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table
from llmstudio.paging import Listing, Page, Paged

from .core import ON_JOB_COMPLETED, RUNNING, Evaluation

metadata = MetaData()

evaluations = Table(
    "evaluator_evaluations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("job_id", String(128), nullable=False, index=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("trigger", String(64), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("actor", String(256), nullable=False),
    Column("traceparent", String(128), nullable=False),
    Column("job", JSON, nullable=False),
    Column("base_metrics", JSON, nullable=False),
    Column("tuned_metrics", JSON, nullable=False),
    Column("report_key", String(512), nullable=False),
    Column("error", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("request", JSON, nullable=False),  # CreateEvaluation's, resolved ({} for a job's)
    Column("comparisons", JSON, nullable=False),  # per metric: diff and its bootstrap interval
    # Idempotency: a redelivered or re-published trigger finds the row already there, and two
    # replicas racing on the same event cannot both insert.
    UniqueConstraint("job_id", "trigger", name="uq_evaluator_evaluations_job_trigger"),
)

# What CreateEvaluation resolves names with, kept from other services' events: the tenant's
# dataset versions (dataset.registered: split keys) and model versions (version_registered: the
# job, whose JobSucceeded payload is the `job` of its evaluation).
datasets = Table(
    "evaluator_datasets",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("dataset_id", String(256), primary_key=True),
    Column("artifacts", JSON, nullable=False),
)

model_versions = Table(
    "evaluator_model_versions",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("model_name", String(256), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("job_id", String(128), nullable=False),
)

outbox = outbox_table(metadata, "evaluator")


class Unit(OutboxUnit):
    """The queries of one transaction (the outbox's from `OutboxUnit`)."""

    outbox_table = outbox

    def add(self, ev: Evaluation) -> None:
        self.conn.execute(evaluations.insert().values(
            **_row(ev), created_at=ev.created_at, updated_at=ev.created_at))

    def for_job(self, job_id: str, trigger: str) -> Evaluation | None:
        q = select(evaluations).where(
            evaluations.c.job_id == job_id, evaluations.c.trigger == trigger)
        row = self.conn.execute(q).first()
        return _evaluation(row) if row else None

    def get(self, evaluation_id: str, tenant: str) -> Evaluation | None:
        q = select(evaluations).where(
            evaluations.c.id == evaluation_id, evaluations.c.tenant == tenant)
        row = self.conn.execute(q).first()
        return _evaluation(row) if row else None

    def of_tenant(self, tenant: str, job_id: str = "",
                  page: Page | None = None) -> Paged[Evaluation]:
        """The tenant's evaluations (of one job, if given), oldest first; `page` of them (None:
        all)."""
        q = select(evaluations).where(evaluations.c.tenant == tenant)
        if job_id:
            q = q.where(evaluations.c.job_id == job_id)
        if page is not None:
            if page.after is not None:
                created, evaluation_id = page.after
                created_at = datetime.fromisoformat(str(created))
                q = q.where(or_(evaluations.c.created_at > created_at, and_(
                    evaluations.c.created_at == created_at, evaluations.c.id > evaluation_id)))
            q = q.limit(page.rows_to_read)
        rows = self.conn.execute(q.order_by(evaluations.c.created_at, evaluations.c.id))
        return EVALUATIONS.paged([_evaluation(r) for r in rows], page)

    def running(self) -> list[Evaluation]:
        """Evaluations not finished: at start, the ones a previous process left running."""
        q = select(evaluations).where(evaluations.c.status == RUNNING)
        return [_evaluation(r) for r in self.conn.execute(q.order_by(evaluations.c.created_at))]

    def job_of_version(self, tenant: str, model_name: str, version: int) -> dict | None:
        """The JobSucceeded payload of the job that made `model_name` v`version` of `tenant`
        (None: no such version, or its job was never seen here)."""
        q = select(evaluations.c.job).select_from(model_versions.join(
            evaluations, and_(evaluations.c.job_id == model_versions.c.job_id,
                              evaluations.c.tenant == model_versions.c.tenant,
                              evaluations.c.trigger == ON_JOB_COMPLETED))).where(
            model_versions.c.tenant == tenant, model_versions.c.model_name == model_name,
            model_versions.c.version == version)
        return self.conn.execute(q).scalar()

    def dataset_artifacts(self, tenant: str, dataset_id: str) -> dict[str, str] | None:
        q = select(datasets.c.artifacts).where(datasets.c.tenant == tenant,
                                               datasets.c.dataset_id == dataset_id)
        return self.conn.execute(q).scalar()

    def record_dataset(self, tenant: str, dataset_id: str, artifacts: dict[str, str]) -> None:
        if self.dataset_artifacts(tenant, dataset_id) is None:
            self.conn.execute(datasets.insert().values(
                tenant=tenant, dataset_id=dataset_id, artifacts=artifacts))

    def record_version(self, tenant: str, model_name: str, version: int, job_id: str) -> None:
        q = select(model_versions.c.job_id).where(
            model_versions.c.tenant == tenant, model_versions.c.model_name == model_name,
            model_versions.c.version == version)
        if self.conn.execute(q).first() is None:
            self.conn.execute(model_versions.insert().values(
                tenant=tenant, model_name=model_name, version=version, job_id=job_id))

    def for_trigger(self, tenant: str, trigger: str) -> Evaluation | None:
        q = select(evaluations).where(evaluations.c.tenant == tenant,
                                      evaluations.c.trigger == trigger)
        row = self.conn.execute(q).first()
        return _evaluation(row) if row else None

    def save(self, ev: Evaluation) -> None:
        """Write the outcome of `ev` (status, metrics, report, error)."""
        self.conn.execute(evaluations.update().where(evaluations.c.id == ev.id)
                          .values(**_row(ev), updated_at=datetime.now(UTC)))


class EvaluationStore(UnitOfWorkStore[Unit]):
    service = "evaluator"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"
    legacy_tables = frozenset({"evaluations"})  # renamed evaluator_evaluations by 0002


def _row(ev: Evaluation) -> dict:
    return {
        "id": ev.id, "job_id": ev.job_id, "tenant": ev.tenant, "trigger": ev.trigger,
        "status": ev.status, "actor": ev.actor, "traceparent": ev.traceparent, "job": ev.job,
        "base_metrics": ev.base_metrics, "tuned_metrics": ev.tuned_metrics,
        "report_key": ev.report_key, "error": ev.error, "request": ev.request,
        "comparisons": ev.comparisons,
    }


# ListEvaluations pages oldest first (`Unit.of_tenant`).
EVALUATIONS: Listing[Evaluation] = Listing(lambda ev: (ev.created_at.isoformat(), ev.id),
                                           (str, str))


def _evaluation(row) -> Evaluation:
    created = row.created_at
    if created.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
        created = created.replace(tzinfo=UTC)
    return Evaluation(
        id=row.id, job_id=row.job_id, tenant=row.tenant, job=row.job, actor=row.actor,
        traceparent=row.traceparent, trigger=row.trigger, status=row.status,
        base_metrics=row.base_metrics, tuned_metrics=row.tuned_metrics,
        report_key=row.report_key, error=row.error, created_at=created,
        request=row.request or {}, comparisons=row.comparisons or [],
    )

"""Scheduler persistence (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Tables are prefixed `scheduler_` because the services may share one PostgreSQL database; the
schema is made and upgraded by the Alembic scripts in `migrations/` (`SchedulerStore.migrate()`,
at start). Each use case runs in one transaction (`store.in_unit`, `outbox.transact`), and the
events it announces go into the outbox table in that same transaction. A job row carries a
version: a save applies only to the version that was read, so two writers never silently
overwrite each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    func,
    or_,
    select,
)

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table
from llmstudio.paging import Listing, Page, Paged

from .core import ACTIVE, Job, Quota, Status, job_from_dict, job_to_dict, now_iso

metadata = MetaData()

jobs = Table(
    "scheduler_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("model_name", String(256), nullable=False),
    Column("dataset_id", String(256), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("traceparent", String(128), nullable=False),
    Column("idempotency_key", String(256), nullable=True),
    Column("dataset_sha256", String(64), nullable=False),
    Column("dataset_artifacts", JSON, nullable=False),
    Column("worker_id", String(256), nullable=False),
    Column("assigned_at", String(40), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("cancel_requested", Boolean, nullable=False),
    Column("pause_requested", Boolean, nullable=False),
    Column("error", Text, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("artifacts", JSON, nullable=False),
    Column("memory_estimate", JSON, nullable=False),
    Column("attempts", JSON, nullable=False),  # core.Attempt records, oldest first
    Column("version", Integer, nullable=False),
    # A retried CreateJob with the same key finds the job it created (NULL keys never clash).
    UniqueConstraint("tenant", "idempotency_key", name="scheduler_jobs_idempotency"),
    Index("scheduler_jobs_tenant_status", "tenant", "status"),
    Index("scheduler_jobs_status", "status"),
)

# Every metrics sample of a job, replayed to a new WatchJob; one row per (job, step).
samples = Table(
    "scheduler_metric_samples",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("step", Integer, primary_key=True, autoincrement=False),
    Column("metrics", JSON, nullable=False),
    Column("recorded_at", String(40), nullable=False),
)

# Each tenant's quota and fair-share weight (core.Quota); a tenant without a row has none.
quotas = Table(
    "scheduler_quotas",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("max_running", Integer, nullable=False),
    Column("max_queued", Integer, nullable=False),
    Column("max_gpus", Integer, nullable=False),
    Column("max_cpu_slots", Integer, nullable=False),
    Column("weight", Float, nullable=False),
    Column("updated_by", String(256), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

outbox = outbox_table(metadata, "scheduler")


class Conflict(Exception):
    """The job changed between read and save; the caller reads it again (or the bus retries)."""


class Unit(OutboxUnit):
    """The queries of one transaction (the outbox's from `OutboxUnit`)."""

    outbox_table = outbox

    # -- jobs -------------------------------------------------------------------------------
    def job(self, job_id: str, tenant: str | None = None) -> Job | None:
        query = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        row = self.conn.execute(query).first()
        return _job(row) if row else None

    def job_by_key(self, tenant: str, idempotency_key: str) -> Job | None:
        row = self.conn.execute(
            select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == idempotency_key)
        ).first()
        return _job(row) if row else None

    def jobs(self, tenant: str, status: Status | None = None,
             page: Page | None = None) -> Paged[Job]:
        """The tenant's jobs (of one status, if given), newest first; `page` of them (None:
        all)."""
        query = select(jobs).where(jobs.c.tenant == tenant)
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if page is not None:
            if page.after is not None:
                created_at, job_id = page.after
                query = query.where(or_(jobs.c.created_at < created_at, and_(
                    jobs.c.created_at == created_at, jobs.c.id > job_id)))
            query = query.limit(page.rows_to_read)
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id)
        return JOBS.paged([_job(r) for r in self.conn.execute(query)], page)

    def add_job(self, job: Job) -> None:
        self.conn.execute(_INSERT_JOB, _row(job))

    def save(self, job: Job) -> Job:
        """Write `job` over the version it was read at; return it with the new version."""
        saved = dataclasses.replace(job, version=job.version + 1, updated_at=now_iso())
        row = _row(saved)
        row["job_id"] = row.pop("id")
        result = self.conn.execute(_UPDATE_JOB, {**row, "read_version": job.version})
        if result.rowcount != 1:
            raise Conflict(f"job {job.id} changed since version {job.version}")
        return saved

    def waiting_jobs(self, per_queue: int = 0) -> list[Job]:
        """Queued jobs no worker holds: what placement hands out. `per_queue`: only the oldest
        that many of each (tenant, class) queue, the only ones a placement round can reach
        (0: all)."""
        waiting = (jobs.c.status == Status.QUEUED.value, jobs.c.worker_id == "",
                   jobs.c.cancel_requested.is_(False))
        if not per_queue:
            return [_job(r) for r in self.conn.execute(select(jobs).where(*waiting))]
        place_in_queue = func.row_number().over(
            partition_by=(jobs.c.tenant, jobs.c.priority),
            order_by=(jobs.c.created_at, jobs.c.id)).label("place_in_queue")
        ranked = select(jobs, place_in_queue).where(*waiting).subquery()
        rows = self.conn.execute(select(ranked).where(ranked.c.place_in_queue <= per_queue))
        return [_job(r) for r in rows]

    def assigned_jobs(self) -> list[Job]:
        """Active jobs a worker holds (assigned, or running)."""
        rows = self.conn.execute(
            select(jobs).where(
                jobs.c.status.in_([Status.QUEUED.value, Status.RUNNING.value]),
                jobs.c.worker_id != "",
            )
        )
        return [_job(r) for r in rows]

    def waiting_count(self, tenant: str) -> int:
        """The tenant's jobs not yet on a worker: what its queued quota bounds."""
        return int(self.conn.execute(select(func.count()).select_from(jobs).where(
            jobs.c.tenant == tenant, jobs.c.worker_id == "",
            jobs.c.status.in_([s.value for s in ACTIVE if s != Status.RUNNING]))).scalar_one())

    # -- quotas -----------------------------------------------------------------------------
    def quota(self, tenant: str) -> Quota | None:
        row = self.conn.execute(select(quotas).where(quotas.c.tenant == tenant)).first()
        return Quota(**row._mapping) if row else None

    def quotas(self) -> dict[str, Quota]:
        return {r.tenant: Quota(**r._mapping) for r in self.conn.execute(select(quotas))}

    def set_quota(self, quota: Quota) -> None:
        row = dataclasses.asdict(quota)
        if self.conn.execute(quotas.update().where(quotas.c.tenant == quota.tenant)
                             .values(row)).rowcount == 0:
            self.conn.execute(quotas.insert().values(row))

    # -- metrics samples --------------------------------------------------------------------
    def add_sample(self, job_id: str, step: int, metrics: dict[str, float]) -> bool:
        """Record a sample once; False if this step is already stored (a redelivery)."""
        exists = self.conn.execute(
            select(samples.c.step).where(samples.c.job_id == job_id, samples.c.step == step)
        ).first()
        if exists:
            return False
        self.conn.execute(_INSERT_SAMPLE, {"job_id": job_id, "step": step, "metrics": metrics,
                                           "recorded_at": now_iso()})
        return True

    def samples(self, job_id: str) -> list[tuple[int, dict[str, float]]]:
        rows = self.conn.execute(
            select(samples.c.step, samples.c.metrics)
            .where(samples.c.job_id == job_id)
            .order_by(samples.c.step)
        )
        return [(r.step, r.metrics) for r in rows]


class SchedulerStore(UnitOfWorkStore[Unit]):
    """Each use case runs in one transaction: `await store.in_unit(Unit.job, ...)`."""

    service = "scheduler"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"


_JOB_FIELDS = [f.name for f in dataclasses.fields(Job)]
# Constant statements, their values bound per call: compiled once (SQLAlchemy caches them), not
# built and coerced column by column on every write.
_INSERT_JOB = jobs.insert()
# (its SET clause: the columns of the parameters it is executed with)
_UPDATE_JOB = jobs.update().where(
    jobs.c.id == bindparam("job_id"), jobs.c.version == bindparam("read_version"))
_INSERT_SAMPLE = samples.insert()


def _row(job: Job) -> dict:
    return job_to_dict(job)


# ListJobs pages newest first (`Unit.jobs`).
JOBS: Listing[Job] = Listing(lambda job: (job.created_at, job.id), (str, str))


def _job(row) -> Job:
    return job_from_dict({name: row._mapping[name] for name in _JOB_FIELDS})

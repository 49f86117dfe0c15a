"""The scheduler's Alembic migrations on SQLite and PostgreSQL (the db_url fixture): rows written
under the first schema read back right at head; a database made before migrations existed is
stamped and upgraded on start; the models at head match the migrated schema."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.outbox import Outbox
from services.scheduler import store as head
from services.scheduler.core import Status, WorkerTable
from services.scheduler.store import SchedulerStore
from services.scheduler.usecases import Jobs
from services.scheduler.watch import Watchers
from tests.support.migrations import (
    LEGACY_DATABASES,
    assert_schema_history,
    store_fixture,
    upgrade_legacy_database,
)

# The schema as `create_all` made it before migrations (commit 030388d): what revision 0001 is.
OLD = sa.MetaData()
OLD_JOBS = sa.Table(
    "scheduler_jobs", OLD,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("dataset_id", sa.String(256), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False),
    sa.Column("traceparent", sa.String(128), nullable=False),
    sa.Column("idempotency_key", sa.String(256), nullable=True),
    sa.Column("dataset_sha256", sa.String(64), nullable=False),
    sa.Column("dataset_artifacts", sa.JSON, nullable=False),
    sa.Column("worker_id", sa.String(256), nullable=False),
    sa.Column("assigned_at", sa.String(40), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("artifacts", sa.JSON, nullable=False),
    sa.Column("memory_estimate", sa.JSON, nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.UniqueConstraint("tenant", "idempotency_key", name="scheduler_jobs_idempotency"),
    sa.Index("scheduler_jobs_tenant_status", "tenant", "status"),
    sa.Index("scheduler_jobs_status", "status"),
)
OLD_SAMPLES = sa.Table(
    "scheduler_job_metrics", OLD,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("step", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("recorded_at", sa.String(40), nullable=False),
)
OLD_OUTBOX = sa.Table(
    "scheduler_outbox", OLD,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("envelope", sa.Text, nullable=False),
    sa.Column("traceparent", sa.String(128), nullable=False, default=""),
    sa.Column("created_at", sa.String(40), nullable=False),
)

TENANT = "acme"
ESTIMATE = {"weights": 1.0, "gradients": 2.0, "optimizer": 3.0, "activations": 4.0, "total": 10.0}
ARTIFACTS = {"train": "datasets/ds-1/train.jsonl"}


store = store_fixture(SchedulerStore)


def old_job(job_id: str, **overrides) -> dict:
    return {
        "id": job_id, "tenant": TENANT, "status": "succeeded",
        "spec": {"base_model": "/m", "dataset": "ds-1", "hyperparameters": {"max_steps": 3}},
        "model_name": "m-lora", "dataset_id": "ds-1", "priority": 2, "created_by": "key-1",
        "created_at": f"2025-01-0{job_id[-1]}T00:00:00.000000Z",
        "updated_at": "2025-01-09T00:00:00.000000Z", "trace_id": "ab" * 16,
        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", "idempotency_key": None,
        "dataset_sha256": "ef" * 32, "dataset_artifacts": ARTIFACTS, "worker_id": "w-1",
        "assigned_at": "2025-01-09T00:00:00.000000Z", "attempt": 2, "cancel_requested": False,
        "error": "", "metrics": {"step": 3.0, "final_loss": 1.5},
        "artifacts": {"checkpoint": "ck/3", "adapter": "ad/x"}, "memory_estimate": ESTIMATE,
        "version": 7, **overrides,
    }


def write_old_rows(engine: sa.Engine) -> None:
    """Rows as the old code wrote them, and as a database older still held them (a job from
    before memory_estimate existed: SQL NULL; one the JSON type wrote as JSON null)."""
    with engine.begin() as conn:
        conn.execute(OLD_JOBS.insert(), [
            old_job("job-1", idempotency_key="k-1"),
            old_job("job-2", status="queued", worker_id="", cancel_requested=True,
                    memory_estimate=sa.null()),
            old_job("job-3", status="failed", error="worker w-1 lost", memory_estimate=None),
        ])
        conn.execute(OLD_SAMPLES.insert(), [
            {"job_id": "job-1", "step": s, "metrics": {"step": float(s), "loss": 3.0 - s},
             "recorded_at": "2025-01-09T00:00:00.000000Z"} for s in (1, 2, 3)
        ])
        conn.execute(OLD_OUTBOX.insert().values(
            subject="llmstudio.job.queued.job-2", envelope='{"id": "e-1"}', traceparent="tp",
            created_at="2025-01-09T00:00:00.000000Z"))


async def assert_old_rows_read_back(store: SchedulerStore) -> None:
    outbox = Outbox(store, Bus(Settings(), "scheduler"), defer_failures=True)
    jobs = Jobs(store, outbox, Watchers(), WorkerTable(1.0))
    one = await jobs.get("job-1", TENANT)
    assert one.status == Status.SUCCEEDED and one.idempotency_key == "k-1"
    assert one.spec["hyperparameters"]["max_steps"] == 3
    assert one.priority == 1  # its old free int (2) became the normal class (migration 0004)
    assert one.attempts == ()  # no history was recorded before migration 0003
    assert one.dataset_artifacts == ARTIFACTS and one.memory_estimate == ESTIMATE
    assert one.artifacts == {"checkpoint": "ck/3", "adapter": "ad/x"}
    assert (one.attempt, one.version, one.worker_id) == (2, 7, "w-1")
    assert one.traceparent.startswith("00-" + "ab" * 16)

    two, three = await jobs.get("job-2", TENANT), await jobs.get("job-3", TENANT)
    assert two.cancel_requested is True and two.status == Status.QUEUED
    assert two.memory_estimate == {} and three.memory_estimate == {}
    assert three.error == "worker w-1 lost"
    assert [j.id for j in await jobs.list(TENANT, None)] == ["job-3", "job-2", "job-1"]
    assert await store.in_unit(lambda u: u.job_by_key(TENANT, "k-1")) == one

    # the samples, in their renamed table, replay to a watcher of the finished job
    replay = [u async for u in jobs.watch("job-1", TENANT)]
    assert [(u.kind, u.step) for u in replay] == [
        ("status", 0), ("metrics", 1), ("metrics", 2), ("metrics", 3)]
    assert replay[3].metrics == {"step": 3.0, "loss": 0.0}
    # the outbox row the old code left unpublished is still there to publish
    (pending,) = await store.in_unit(lambda u: u.pending_events())
    assert (pending.subject, pending.envelope, pending.traceparent) == (
        "llmstudio.job.queued.job-2", '{"id": "e-1"}', "tp")


@pytest.mark.parametrize("made", LEGACY_DATABASES)
async def test_rows_of_the_old_schema_read_back_at_head(store, made):
    upgrade_legacy_database(store, made, OLD, write_old_rows)
    await assert_old_rows_read_back(store)


async def test_a_database_older_than_the_memory_estimate_gets_it(store):
    OLD.create_all(store.engine)
    write_old_rows(store.engine)
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE scheduler_jobs DROP COLUMN memory_estimate"))
    store.migrate()
    for job in await store.in_unit(lambda u: u.jobs(TENANT)):
        assert job.memory_estimate == {}


def test_the_schemas_at_the_first_revision_at_head_and_after_a_downgrade(store):
    assert_schema_history(store, OLD, head.metadata)

"""The evaluator's Alembic migrations, on SQLite and PostgreSQL: the first revision is the schema
the evaluator made before migrations; a database of that schema (with or without a version
table) is upgraded with its rows kept and its unannounced outcomes queued in the outbox; the
models at head match the migrated schema; the downgrade gives the `announced` flags back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from llmstudio.bus import Bus
from llmstudio.events import EvalCompleted, EvalFailed
from llmstudio.outbox import Outbox
from services.evaluator.core import COMPLETED, FAILED, RUNNING
from services.evaluator.store import EvaluationStore, Unit, metadata
from services.evaluator.usecases import Evaluations
from tests.support.migrations import (
    LEGACY_DATABASES,
    assert_schema_history,
    bus_fixture,
    downgrade,
    published,
    rows_of,
    schema_diff,
    store_fixture,
    upgrade_legacy_database,
)

# The schema `create_all` made before migrations (commit 030388d), frozen here.
LEGACY = sa.MetaData()
sa.Table(
    "evaluations", LEGACY,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("job_id", sa.String(128), nullable=False, index=True),
    sa.Column("tenant", sa.String(128), nullable=False, index=True),
    sa.Column("trigger", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("traceparent", sa.String(128), nullable=False),
    sa.Column("job", sa.JSON, nullable=False),
    sa.Column("base_metrics", sa.JSON, nullable=False),
    sa.Column("tuned_metrics", sa.JSON, nullable=False),
    sa.Column("report_key", sa.String(512), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("announced", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("job_id", "trigger", name="uq_evaluations_job_trigger"),
)

TRACE = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
BASE, TUNED = {"eval_loss": 2.5, "exact_match": 0.0}, {"eval_loss": 0.5, "exact_match": 0.75}


def row(n: int, status: str, announced: bool, **over) -> dict:
    at = datetime(2030, 1, 1, 0, n, tzinfo=UTC)
    values = {
        "id": f"ev-{n:012d}", "job_id": f"job-{n}", "tenant": "acme", "trigger": "job.completed",
        "status": status, "actor": "alice", "traceparent": TRACE,
        "job": {"job_id": f"job-{n}", "model_name": "tiny-full"},
        "base_metrics": {}, "tuned_metrics": {}, "report_key": "", "error": "",
        "announced": announced, "created_at": at, "updated_at": at,
    }
    return values | over


# A running evaluation, one announced, one completed and one failed whose events never went out.
ROWS = [
    row(0, RUNNING, False),
    row(1, COMPLETED, True, base_metrics=BASE, tuned_metrics=TUNED,
        report_key="evaluations/ev-1/report.json"),
    row(2, COMPLETED, False, base_metrics=BASE, tuned_metrics=TUNED,
        report_key="evaluations/ev-2/report.json"),
    row(3, FAILED, False, error="ValueError: no 'validation' split"),
]
UNANNOUNCED = [
    EvalCompleted(evaluation_id=ROWS[2]["id"], job_id="job-2", model_name="tiny-full",
                  base_metrics=BASE, tuned_metrics=TUNED,
                  report_key="evaluations/ev-2/report.json"),
    EvalFailed(evaluation_id=ROWS[3]["id"], job_id="job-3",
               reason="ValueError: no 'validation' split"),
]


store = store_fixture(EvaluationStore)
bus = bus_fixture("evaluator")


def write_legacy_rows(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(LEGACY.tables["evaluations"].insert(), ROWS)


async def assert_legacy_rows_read_at_head(store: EvaluationStore, bus: Bus) -> None:
    evaluations = Evaluations(store)
    listed = await evaluations.list("acme")
    assert [(e.id, e.job_id, e.status) for e in listed] == [
        (r["id"], r["job_id"], r["status"]) for r in ROWS]
    done = await evaluations.get(ROWS[1]["id"], "acme")
    assert (done.base_metrics, done.tuned_metrics, done.report_key) == (
        BASE, TUNED, "evaluations/ev-1/report.json")
    assert done.job == ROWS[1]["job"] and done.traceparent == TRACE and done.actor == "alice"
    assert done.created_at == ROWS[1]["created_at"]
    assert (await evaluations.get(ROWS[3]["id"], "acme")).error == ROWS[3]["error"]
    # the running one is resumed at start
    assert [e.id for e in await store.in_unit(Unit.running)] == [ROWS[0]["id"]]

    # The outcomes never announced are in the outbox, in their job's trace, and published by
    # the next flush; the announced one is not announced again.
    with store.unit() as u:
        assert [e.traceparent for e in u.pending_events()] == [TRACE, TRACE]
    await Outbox(store, bus).flush()
    sent = await published(bus.settings.nats_url, "llmstudio.eval.>", len(UNANNOUNCED))
    assert [(env.type, env.tenant, env.actor, env.source, subject)
            for env, subject in sent] == [
        (d.TYPE, "acme", "alice", "evaluator", d.subject()) for d in UNANNOUNCED]
    assert [type(d).model_validate(env.data) for (env, _), d in
            zip(sent, UNANNOUNCED, strict=True)] == UNANNOUNCED


@pytest.mark.parametrize("made", LEGACY_DATABASES)
async def test_rows_of_a_legacy_database_are_read_at_head(store, bus, made):
    upgrade_legacy_database(store, made, LEGACY, write_legacy_rows)
    await assert_legacy_rows_read_at_head(store, bus)


def test_the_schemas_at_the_first_revision_at_head_and_after_a_downgrade(store):
    assert_schema_history(store, LEGACY, metadata)


def test_downgrade_gives_back_the_announced_flags(store):
    upgrade_legacy_database(store, "first-revision", LEGACY, write_legacy_rows)
    downgrade(store, "0001")
    assert schema_diff(store, LEGACY) == []
    got = rows_of(store, LEGACY.tables["evaluations"])
    assert [r["announced"] for r in got] == [r["announced"] for r in ROWS]
    assert [{k: r[k] for k in ("id", "status", "tuned_metrics", "error")} for r in got] == [
        {k: r[k] for k in ("id", "status", "tuned_metrics", "error")} for r in ROWS]

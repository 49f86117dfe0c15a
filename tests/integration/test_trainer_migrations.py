"""The trainer-worker's Alembic migrations, on SQLite and PostgreSQL: rows written at the first
revision are read at head, the models at head match the migrated schema, and a downgrade to
nothing removes exactly what the migrations made."""

from __future__ import annotations

import sqlalchemy as sa

from services.trainer.store import TrainerStore, metadata
from tests.support.migrations import at_head, downgrade, schema_diff, store_fixture

store = store_fixture(TrainerStore)


def test_rows_written_at_the_first_revision_are_read_at_head(store):
    store.migrate("0001")
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO trainer_runs (job_id, attempt, tenant, worker_id, status,"
            " checkpoint_key, started_at, updated_at) VALUES"
            " ('job-1', 1, 'acme', 'w1', 'succeeded', 'jobs/job-1/checkpoint-8', 't0', 't1'),"
            " ('job-2', 2, 'acme', 'w1', 'running', '', 't0', 't0')"))
        conn.execute(sa.text(
            "INSERT INTO trainer_outbox (subject, envelope, traceparent, created_at)"
            " VALUES ('llmstudio.job.started.job-2', '{}', '', 't0')"))
    store.migrate()
    with store.unit() as u:
        assert u.finished("job-1", 1) and not u.finished("job-2", 2)
        assert not u.finished("job-1", 2)  # another attempt of the job is another run
        assert [e.subject for e in u.pending_events()] == ["llmstudio.job.started.job-2"]
        u.record("job-2", 2, tenant="acme", worker_id="w1", status="failed")
    with store.unit() as u:
        assert u.status("job-2", 2) == "failed"


def test_models_at_head_match_the_migrated_schema_and_downgrade_removes_it(store):
    store.migrate()
    assert schema_diff(store, metadata) == []
    store.migrate()  # at head already: nothing to do, nothing lost
    assert at_head(store)
    downgrade(store, "base")
    tables = set(sa.inspect(store.engine).get_table_names())
    assert not {"trainer_runs", "trainer_outbox"} & tables

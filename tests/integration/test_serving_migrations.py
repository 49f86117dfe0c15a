"""The serving service's Alembic migrations, on SQLite and PostgreSQL: the models at head match
the migrated schema, a deployment written through the store reads back with its version, and a
downgrade to nothing removes exactly what the migrations made."""

from __future__ import annotations

import sqlalchemy as sa

from services.serving.core import Deployment
from services.serving.store import ServingStore, metadata
from tests.support.migrations import at_head, downgrade, schema_diff, store_fixture

store = store_fixture(ServingStore)


def test_models_at_head_match_the_migrated_schema_and_downgrade_removes_it(store):
    store.migrate()
    assert schema_diff(store, metadata) == []
    store.migrate()  # at head already: nothing to do, nothing lost
    assert at_head(store)
    with store.unit() as u:
        u.add_job("acme", "job-1", "/models/m", "tenants/acme/jobs/job-1/checkpoint-8")
        u.add_version("acme", "m", 1, "job-1")
        u.set_stage("acme", "m", 1, "production")
        u.add_deployment(Deployment("acme", "m", "m", 1, "production", "alice", "t0", "t0"))
    with store.unit() as u:
        v = u.version("acme", "m", stage="production")
        assert (v.version, v.base_model, v.checkpoint_key) == (
            1, "/models/m", "tenants/acme/jobs/job-1/checkpoint-8")
        assert u.version("globex", "m", stage="production") is None  # per tenant
        assert [d.name for d in u.following("acme", "m")] == ["m"]
    downgrade(store, "base")
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {t for t in tables if t.startswith("serving_")} == {"serving_alembic_version"}

"""The registry's Alembic migrations, on SQLite and PostgreSQL: the first revision is the schema
the registry made before migrations, a database of that schema (with or without a version
table) is upgraded with its rows kept, and the models at head match the migrated schema."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from llmstudio.bus import Bus
from llmstudio.events import ModelStageChanged, make_envelope
from llmstudio.outbox import Outbox
from services.registry.core import Stage, StageRequest
from services.registry.store import RegistryStore, Unit, metadata
from services.registry.usecases import Registry
from tests.support.migrations import (
    LEGACY_DATABASES,
    assert_schema_history,
    bus_fixture,
    published,
    store_fixture,
    upgrade_legacy_database,
)

# The schema `create_all` made before migrations (commit 030388d), frozen here.
LEGACY = sa.MetaData()
sa.Table(
    "registry_models", LEGACY,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("created_at", sa.String(40), nullable=False),
)
sa.Table(
    "registry_versions", LEGACY,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("model_name", sa.String(256), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("job_id", sa.String(128), nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("artifacts", sa.JSON, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.UniqueConstraint("tenant", "job_id", name="registry_versions_job"),
)
sa.Table(
    "registry_stage_requests", LEGACY,
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("idempotency_key", sa.String(256), primary_key=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)
sa.Table(
    "registry_outbox", LEGACY,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("envelope", sa.Text, nullable=False),
    sa.Column("traceparent", sa.String(128), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

LINEAGE = {"dataset_id": "ds-1", "job_id": "job-1", "method": "lora",
           "hyperparameters": {"method": "lora", "max_steps": 80}, "evaluation_id": "ev-1"}
PENDING = make_envelope(
    ModelStageChanged(ref="smol-v1", model_name="smol", version=1, from_stage="development",
                      to_stage="staging"),
    source="registry", tenant="acme", actor="alice")


store = store_fixture(RegistryStore)
bus = bus_fixture("registry")


def write_legacy_rows(engine: sa.Engine) -> None:
    """Rows as the registry wrote them before migrations: a model with two versions (one
    evaluated and in staging), a SetStage idempotency key, an event not yet published."""
    t = LEGACY.tables
    with engine.begin() as conn:
        conn.execute(t["registry_models"].insert(), [
            {"tenant": "acme", "name": "smol", "created_at": "2030-01-01T00:00:00.000Z"}])
        conn.execute(t["registry_versions"].insert(), [
            {"tenant": "acme", "model_name": "smol", "version": 1, "stage": "staging",
             "job_id": "job-1", "lineage": LINEAGE,
             "metrics": {"final_loss": 0.125, "tuned_exact_match": 0.95},
             "artifacts": {"adapter": "adapters/job-1"},
             "created_at": "2030-01-01T00:00:00.000Z", "updated_at": "2030-01-02T00:00:00.000Z"},
            {"tenant": "acme", "model_name": "smol", "version": 2, "stage": "development",
             "job_id": "job-2", "lineage": {}, "metrics": {}, "artifacts": {},
             "created_at": "2030-01-03T00:00:00.000Z", "updated_at": "2030-01-03T00:00:00.000Z"},
        ])
        conn.execute(t["registry_stage_requests"].insert(), [
            {"tenant": "acme", "idempotency_key": "k1", "model_name": "smol", "version": 1,
             "stage": "staging", "created_at": "2030-01-02T00:00:00.000Z"}])
        conn.execute(t["registry_outbox"].insert(), [
            {"subject": "llmstudio.model.stage_changed.smol-v1",
             "envelope": PENDING.model_dump_json(), "traceparent": "",
             "created_at": "2030-01-02T00:00:00.000Z"}])


async def assert_legacy_rows_read_through_use_cases(store: RegistryStore, bus: Bus) -> None:
    registry = Registry(store, Outbox(store, bus))
    [model] = await registry.list_models("acme")
    assert (model.name, model.created_at, [v.version for v in model.versions]) == (
        "smol", "2030-01-01T00:00:00.000Z", [1, 2])
    v1 = await registry.get_version("acme", "smol", 1)
    assert (v1.stage, v1.job_id, v1.lineage, v1.artifacts) == (
        Stage.STAGING, "job-1", LINEAGE, {"adapter": "adapters/job-1"})
    assert v1.metrics == {"final_loss": 0.125, "tuned_exact_match": 0.95}
    assert (v1.created_at, v1.updated_at) == (
        "2030-01-01T00:00:00.000Z", "2030-01-02T00:00:00.000Z")
    assert (await registry.get_version("acme", "smol", 0)).version == 2
    # The stored idempotency key still answers its request without applying it again ...
    replayed = await registry.set_stage("acme", "alice", StageRequest("smol", 1, Stage.STAGING),
                                        "k1")
    assert replayed == v1
    # ... and the event left in the outbox is published, with the id it was written with.
    sent = await published(bus.settings.nats_url, "llmstudio.model.>", 1)
    assert [(env.id, subject) for env, subject in sent] == [
        (PENDING.id, "llmstudio.model.stage_changed.smol-v1")]
    # New versions number on from the stored ones (under a policy that gates no stage).
    await store.in_unit(Unit.set_gated_stages, "acme", 1, [], "2030-01-04T00:00:00.000Z")
    moved = await registry.set_stage("acme", "alice", StageRequest("smol", 2, Stage.STAGING))
    sent = await published(bus.settings.nats_url, "llmstudio.model.>", 2)
    assert moved.stage == Stage.STAGING and len(sent) == 2


@pytest.mark.parametrize("made", LEGACY_DATABASES)
async def test_rows_of_a_legacy_database_are_read_at_head(store, bus, made):
    upgrade_legacy_database(store, made, LEGACY, write_legacy_rows)
    await assert_legacy_rows_read_through_use_cases(store, bus)


def test_the_schemas_at_the_first_revision_at_head_and_after_a_downgrade(store):
    assert_schema_history(store, LEGACY, metadata)

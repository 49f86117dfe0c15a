"""The dataset service's Alembic migrations, on SQLite and PostgreSQL: the first revision is the
schema the service made before migrations (`create_all` at commit 030388d); a database of that
schema (with or without a version table) is upgraded with its versions kept and the
DatasetRegistered of those never announced queued in the outbox; the models at head match the
migrated schema; the downgrade gives the `announced` flags back.

Issue 8's example: the dataset table gained NOT NULL columns with only `create_all`, so an
existing `.llmstudio/dataset.db` broke at its first read. Here such a database is started on:
stamped, upgraded, and its datasets read over gRPC."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import DatasetRegistered
from llmstudio.natsserver import free_port
from llmstudio.outbox import Outbox
from llmstudio.storage import LocalArtifactStore
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc
from services.dataset.app import build
from services.dataset.core import DatasetRecord
from services.dataset.store import DatasetStore, metadata
from services.dataset.usecases import Datasets, registered
from tests.support.harness import put_api_key, running
from tests.support.migrations import (
    LEGACY_DATABASES,
    assert_schema_history,
    at_head,
    bus_fixture,
    downgrade,
    published,
    rows_of,
    schema_diff,
    store_fixture,
    upgrade_legacy_database,
)

# The table `create_all` made before migrations (services/dataset/store.py at commit 030388d),
# frozen here as that code declared it.
LEGACY = sa.MetaData()
sa.Table(
    "datasets",
    LEGACY,
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
    sa.Column("announced", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("tenant", "idempotency_key", name="uq_datasets_tenant_idempotency"),
    sa.UniqueConstraint("tenant", "name", "version", name="uq_datasets_tenant_name_version"),
    sa.Index("ix_datasets_tenant_name", "tenant", "name"),
)
SHA = {"rows": "a" * 64, "child": "b" * 64}


def row(n: int, announced: bool, **over) -> dict:
    sha = SHA["rows"]
    values = {
        "id": f"ds-00000000000{n}", "tenant": "acme", "name": "reverse", "sha256": sha,
        "format": "prompt_completion", "num_rows": 40, "train_rows": 36, "validation_rows": 4,
        "test_rows": 0,
        "artifacts": {"raw": f"blobs/sha256/{n}", "rows": f"datasets/{sha}/rows.jsonl",
                      "train": f"datasets/{sha}/seed0-val0.1/train.jsonl",
                      "validation": f"datasets/{sha}/seed0-val0.1/validation.jsonl",
                      "report": f"datasets/reports/ds-00000000000{n}.json"},
        "split_sha256": {"train": "1" * 64, "validation": "2" * 64},
        "validation_fraction": 0.1, "test_fraction": 0.0, "seed": 2**40, "version": 1,
        "parent_id": "", "transformation": '{"op": "upload"}', "status": "accepted",
        "warnings": [], "source_schema": "alpaca", "source_format": "csv",
        "description": "reversed words", "created_at": f"2025-01-01T00:00:0{n}.000000Z",
        "created_by": "key-alice", "idempotency_key": None, "request_sha256": "f" * 64,
        "announced": announced,
    }
    return values | over


# An announced upload; a derived version and another tenant's upload whose events never went out.
ROWS = [
    row(1, True, idempotency_key="upload-1"),
    row(2, False, version=2, parent_id="ds-000000000001", sha256=SHA["child"], num_rows=37,
        train_rows=30, validation_rows=4, test_rows=3, test_fraction=0.1,
        transformation='{"op": "derive", "parent": "ds-000000000001", "redact_pii": true}',
        status="accepted_with_warnings", warnings=["2 rows with PII"], description=""),
    row(3, False, tenant="globex", name="chat", format="messages", created_by="key-bob"),
]


def record(values: dict) -> DatasetRecord:
    return DatasetRecord(**{k: v for k, v in values.items() if k != "announced"})


store = store_fixture(DatasetStore)
bus = bus_fixture("dataset")


def write_legacy_rows(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(LEGACY.tables["datasets"].insert(), ROWS)


async def assert_legacy_rows_read_at_head(store: DatasetStore, bus: Bus, tmp_path) -> None:
    outbox = Outbox(store, bus)
    datasets = Datasets(store, outbox, LocalArtifactStore(tmp_path / "artifacts"),
                        Settings(data_dir=tmp_path))
    try:
        assert await datasets.versions("acme") == [record(ROWS[0]), record(ROWS[1])]
        assert await datasets.versions("acme", "chat") == []
        assert await datasets.get("globex", ROWS[2]["id"]) == record(ROWS[2])
    finally:
        datasets.close()
    with pytest.raises(IntegrityError), store.unit() as u:  # the unique keys came along
        u.add(record(row(4, False, idempotency_key="upload-1")))

    # The versions never announced are in the outbox, oldest first, and published by the next
    # flush; the announced one is not announced again.
    await outbox.flush()
    unannounced = [registered(record(r)) for r in ROWS[1:]]
    sent = await published(bus.settings.nats_url, "llmstudio.dataset.>", len(unannounced))
    assert [(env.type, env.tenant, env.actor, env.source, subject)
            for env, subject in sent] == [
        (DatasetRegistered.TYPE, r["tenant"], r["created_by"], "dataset", d.subject())
        for r, d in zip(ROWS[1:], unannounced, strict=True)]
    assert [DatasetRegistered.model_validate(env.data) for env, _ in sent] == unannounced
    with store.unit() as u:
        assert u.pending_events() == []


@pytest.mark.parametrize("made", LEGACY_DATABASES)
async def test_rows_of_a_legacy_database_are_read_at_head(store, bus, tmp_path, made):
    upgrade_legacy_database(store, made, LEGACY, write_legacy_rows)
    await assert_legacy_rows_read_at_head(store, bus, tmp_path)


def test_the_schemas_at_the_first_revision_at_head_and_after_a_downgrade(store):
    assert_schema_history(store, LEGACY, metadata)


def test_downgrade_gives_back_the_announced_flags(store):
    upgrade_legacy_database(store, "first-revision", LEGACY, write_legacy_rows)
    downgrade(store, "0001")
    assert schema_diff(store, LEGACY) == []
    assert rows_of(store, LEGACY.tables["datasets"]) == ROWS


async def test_the_service_starts_on_a_database_made_before_migrations(
        store, db_url, nats_server, tmp_path):
    """The database an earlier release left (its table, no version table): the service starts,
    serves its versions, and announces the ones that never were."""
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        database_url=db_url)
    LEGACY.create_all(store.engine)
    write_legacy_rows(store.engine)
    async with running("dataset", build, settings) as port:
        key = await put_api_key(settings.nats_url, "viewer", "acme")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            client = datasets_pb2_grpc.DatasetServiceStub(ch)
            md = (("x-api-key", key),)
            got = await client.GetDataset(
                datasets_pb2.GetDatasetRequest(id=ROWS[1]["id"]), metadata=md)
            listed = await client.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as foreign:
                await client.GetDataset(
                    datasets_pb2.GetDatasetRequest(id=ROWS[2]["id"]), metadata=md)
        announced = await published(nats_server.url, "llmstudio.dataset.>", 2)
    child = ROWS[1]
    assert (got.version, got.parent_id, got.sha256, got.test_rows, list(got.warnings)) == (
        2, child["parent_id"], child["sha256"], 3, child["warnings"])
    assert dict(got.artifacts) == child["artifacts"] and got.seed == 2**40
    assert [d.id for d in listed.datasets] == [ROWS[0]["id"], ROWS[1]["id"]]
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(env.tenant, DatasetRegistered.model_validate(env.data).dataset_id)
            for env, _ in announced] == [
        ("acme", ROWS[1]["id"]), ("globex", ROWS[2]["id"])]
    assert at_head(store)

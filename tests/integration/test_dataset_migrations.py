"""The dataset service's Alembic migrations, on SQLite and PostgreSQL: the first revision is the
schema the service made before migrations (`create_all` at commit 030388d); a database of that
schema (with or without a version table) is upgraded with its versions kept and the
DatasetRegistered of those never announced queued in the outbox; the models at head match the
migrated schema; the downgrade gives the `announced` flags back.

Issue 8's example: the dataset table gained NOT NULL columns with only `create_all`, so an
existing `.llmstudio/dataset.db` broke at its first read. Here such a database is started on:
stamped, upgraded, and its datasets read over gRPC."""

from __future__ import annotations

import asyncio

import grpc
import nats
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from llmstudio.config import Settings
from llmstudio.db import make_engine
from llmstudio.events import DatasetRegistered, Envelope, decode
from llmstudio.migrations import alembic_config, current_revision, version_table
from llmstudio.natsserver import free_port
from llmstudio.outbox import Outbox
from llmstudio.storage import LocalArtifactStore
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc
from services.dataset.app import build
from services.dataset.core import DatasetRecord
from services.dataset.store import DatasetStore, metadata
from services.dataset.usecases import Datasets, registered
from tests.support.harness import put_api_key, running

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


def schema_diff(engine: sa.Engine, models: sa.MetaData) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": version_table("dataset"), "compare_type": True})
        return compare_metadata(ctx, models)


def at_head(store: DatasetStore) -> bool:
    head = ScriptDirectory(str(store.migrations)).get_current_head()
    return current_revision(store.engine, store.migrations, "dataset") == head


def write_legacy_rows(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(LEGACY.tables["datasets"].insert(), ROWS)


class RecordingBus:
    service = "dataset"

    def __init__(self):
        self.published: list[tuple[Envelope, str]] = []

    async def publish_envelope(self, env, subject):
        self.published.append((env, subject))


async def assert_legacy_rows_read_at_head(store: DatasetStore, tmp_path) -> None:
    bus = RecordingBus()
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
    assert [(env.type, env.tenant, env.actor, env.source, subject)
            for env, subject in bus.published] == [
        (DatasetRegistered.TYPE, r["tenant"], r["created_by"], "dataset", d.subject())
        for r, d in zip(ROWS[1:], unannounced, strict=True)]
    assert [DatasetRegistered.model_validate(env.data) for env, _ in bus.published] == unannounced
    with store.unit() as u:
        assert u.pending_events() == []


def test_first_revision_is_the_schema_made_before_migrations(db_url):
    store = DatasetStore(db_url)
    try:
        store.migrate("0001")
        assert schema_diff(store.engine, LEGACY) == []
    finally:
        store.dispose()


async def test_rows_written_at_the_first_revision_are_read_at_head(db_url, tmp_path):
    store = DatasetStore(db_url)
    try:
        store.migrate("0001")
        write_legacy_rows(store.engine)
        store.migrate()
        assert at_head(store)
        await assert_legacy_rows_read_at_head(store, tmp_path)
    finally:
        store.dispose()


async def test_a_database_made_before_migrations_is_stamped_and_upgraded(db_url, tmp_path):
    store = DatasetStore(db_url)
    try:
        LEGACY.create_all(store.engine)  # what the service's start did before migrations
        write_legacy_rows(store.engine)
        store.migrate()
        assert at_head(store)
        await assert_legacy_rows_read_at_head(store, tmp_path)
    finally:
        store.dispose()


def test_the_models_at_head_match_the_migrated_schema(db_url):
    store = DatasetStore(db_url)
    try:
        store.migrate()
        assert schema_diff(store.engine, metadata) == []
    finally:
        store.dispose()


def test_downgrade_gives_back_the_announced_flags(db_url):
    store = DatasetStore(db_url)
    try:
        store.migrate("0001")
        write_legacy_rows(store.engine)
        store.migrate()
        cfg = alembic_config(store.migrations, "dataset")
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        assert schema_diff(store.engine, LEGACY) == []
        with store.engine.connect() as conn:
            table = LEGACY.tables["datasets"]
            got = conn.execute(sa.select(table).order_by(table.c.id)).mappings().all()
        assert [dict(r) for r in got] == ROWS
    finally:
        store.dispose()


async def test_the_service_starts_on_a_database_made_before_migrations(
        db_url, nats_server, tmp_path):
    """The database an earlier release left (its table, no version table): the service starts,
    serves its versions, and announces the ones that never were."""
    settings = Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                        database_url=db_url)
    legacy = make_engine(db_url)
    LEGACY.create_all(legacy)
    write_legacy_rows(legacy)
    legacy.dispose()
    seen: list = []
    nc = await nats.connect(nats_server.url)

    async def on_msg(msg):
        seen.append(decode(msg.data))

    await nc.subscribe("llmstudio.dataset.>", cb=on_msg)
    try:
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
            deadline = asyncio.get_running_loop().time() + 10
            while len(seen) < 2:
                assert asyncio.get_running_loop().time() < deadline, seen
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    child = ROWS[1]
    assert (got.version, got.parent_id, got.sha256, got.test_rows, list(got.warnings)) == (
        2, child["parent_id"], child["sha256"], 3, child["warnings"])
    assert dict(got.artifacts) == child["artifacts"] and got.seed == 2**40
    assert [d.id for d in listed.datasets] == [ROWS[0]["id"], ROWS[1]["id"]]
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(env.tenant, data.dataset_id) for env, data in seen] == [
        ("acme", ROWS[1]["id"]), ("globex", ROWS[2]["id"])]
    store = DatasetStore(db_url)
    try:
        assert at_head(store)
    finally:
        store.dispose()

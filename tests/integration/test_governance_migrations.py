"""Governance's Alembic migrations, on SQLite and PostgreSQL: the first revision is the schema
governance made before migrations (`audit_log`, `api_keys`); a database of that schema, with or
without a version table, is upgraded (tables renamed `governance_*`, an outbox added) with its
keys and its hash chain kept; the models at head match the migrated schema; downgrade returns
to the first revision's schema."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from dataclasses import asdict

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js.errors import NoKeysError

from llmstudio.auth import KeyDirectory, Principal, hash_secret
from llmstudio.bus import APIKEY_BUCKET, Bus
from llmstudio.events import JobQueued, make_envelope
from llmstudio.outbox import Outbox
from llmstudio.storage import LocalArtifactStore
from services.governance.anchor import CheckpointStore
from services.governance.config import AuditAnchorSettings
from services.governance.core import AuditEvent, chain
from services.governance.handlers import audit_event
from services.governance.store import GovernanceStore, metadata
from services.governance.usecases import AuditLog, Checkpointer, KeyManager
from tests.support.migrations import (
    LEGACY_DATABASES,
    assert_schema_history,
    bus_fixture,
    store_fixture,
    upgrade_legacy_database,
)

# The schema `create_all` made before migrations (commit 030388d), frozen here.
LEGACY = sa.MetaData()
sa.Table(
    "audit_log", LEGACY,
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.String(128), nullable=False, unique=True),
    sa.Column("event_type", sa.String(255), nullable=False, index=True),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("entity", sa.String(255), nullable=False, index=True),
    sa.Column("source", sa.String(255), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("data_json", sa.Text, nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
sa.Table(
    "api_keys", LEGACY,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("roles", sa.JSON, nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("revoked_at", sa.String(40)),
)

ADMIN, DEV, GONE = "lls_admin-secret", "lls_dev-secret", "lls_revoked-secret"
KEYS = [
    {"key_id": "key-00000001", "key_hash": hash_secret(ADMIN), "tenant": "default",
     "roles": ["admin"], "name": "bootstrap-admin", "created_at": "2030-01-01T00:00:00+00:00",
     "created_by": "governance", "revoked_at": None},
    {"key_id": "key-00000002", "key_hash": hash_secret(DEV), "tenant": "acme",
     "roles": ["developer"], "name": "ci", "created_at": "2030-01-02T00:00:00+00:00",
     "created_by": "key-00000001", "revoked_at": None},
    {"key_id": "key-00000003", "key_hash": hash_secret(GONE), "tenant": "acme",
     "roles": ["viewer"], "name": "old", "created_at": "2030-01-03T00:00:00+00:00",
     "created_by": "key-00000001", "revoked_at": "2030-01-04T00:00:00+00:00"},
]


def legacy_audit_records() -> list[dict]:
    """Three chained records, as the audit consumers wrote them."""
    records, head = [], None
    for i, tenant in enumerate(["acme", "beta", "acme"], start=1):
        event = AuditEvent(
            event_id=f"ev-{i}", event_type="llmstudio.job.queued.v1",
            subject=f"llmstudio.job.queued.job-{i}", entity=f"job-{i}", source="scheduler",
            tenant=tenant, actor="key-00000002", time=f"2030-01-0{i}T00:00:00+00:00",
            data_json=f'{{"dataset_sha256":"ab","job_id":"job-{i}"}}', trace_id="0" * 32)
        head = chain(event, head)
        records.append(asdict(head))
    return records


def write_legacy_rows(engine: sa.Engine) -> list[dict]:
    records = legacy_audit_records()
    with engine.begin() as conn:
        conn.execute(LEGACY.tables["audit_log"].insert(), records)
        conn.execute(LEGACY.tables["api_keys"].insert(), KEYS)
    return records


store = store_fixture(GovernanceStore)
bus = bus_fixture("governance")


async def keys_of(kv) -> list[str]:
    """The bucket's keys: nats-py lists them through a watcher that, on a loaded machine, may
    give up before the first entry arrives (NoKeysError): ask again."""
    for _ in range(4):
        with contextlib.suppress(NoKeysError):
            return await kv.keys()
        await asyncio.sleep(0.5)
    return await kv.keys()


async def assert_legacy_rows_read_through_use_cases(
    store: GovernanceStore, bus: Bus, records: list[dict]
) -> None:
    # The keys: no second bootstrap admin; the live ones go to the key bucket, the revoked not.
    keys = KeyManager(store, Outbox(store, bus), bus, KeyDirectory())
    assert await keys.bootstrap("") is None
    kv = await bus.kv(APIKEY_BUCKET)
    # an entry governance never issued (someone reached the bucket): gone after the sync
    await kv.put(hash_secret("forged"), Principal("key-forged", "acme", ("admin",)).to_json())
    await keys.sync_bucket()
    assert Principal.from_json((await kv.get(hash_secret(DEV))).value) == Principal(
        "key-00000002", "acme", ("developer",), "ci")
    assert sorted(await keys_of(kv)) == sorted([hash_secret(ADMIN), hash_secret(DEV)])
    revoked = await keys.revoke("key-00000002", Principal("key-00000001", "default", ("admin",)))
    assert (revoked.key_id, revoked.roles, revoked.created_by) == (
        "key-00000002", ("developer",), "key-00000001")
    with store.unit() as u:
        assert u.pending_events() == []  # its ApiKeyRevoked went through the outbox

    # The audit log: the chain verifies across the upgrade and goes on from its head.
    with tempfile.TemporaryDirectory() as artifacts:
        audit = AuditLog(store, Checkpointer(
            store, CheckpointStore(LocalArtifactStore(artifacts)), Ed25519PrivateKey.generate(),
            AuditAnchorSettings()))
        await assert_legacy_chain_goes_on(audit, records)


async def assert_legacy_chain_goes_on(audit: AuditLog, records: list[dict]) -> None:
    platform_admin = Principal("key-00000001", "default", ("admin",))
    verified = await audit.verify(platform_admin)
    assert (verified.ok, verified.records, verified.head_hash) == (True, 3, records[-1]["hash"])
    mine = await audit.query(Principal("key-acme-admin", "acme", ("admin",)),
                             event_type_prefix="llmstudio.job.")
    assert [asdict(r) for r in mine] == [records[0], records[2]]
    env = make_envelope(JobQueued(job_id="job-4", dataset_sha256="cd"), source="s", tenant="acme")
    appended = await audit.append(audit_event(env, JobQueued(**env.data)))
    assert (appended.sequence, appended.prev_hash) == (4, records[-1]["hash"])
    assert (await audit.verify(platform_admin)).ok


@pytest.mark.parametrize("made", LEGACY_DATABASES)
async def test_rows_of_a_legacy_database_are_read_at_head(store, bus, made):
    records = upgrade_legacy_database(store, made, LEGACY, write_legacy_rows)
    assert not {"audit_log", "api_keys"} & set(sa.inspect(store.engine).get_table_names())
    await assert_legacy_rows_read_through_use_cases(store, bus, records)


def test_the_schemas_at_the_first_revision_at_head_and_after_a_downgrade(store):
    assert_schema_history(store, LEGACY, metadata)

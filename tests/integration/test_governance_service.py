"""Governance in-process against a real nats-server: API keys end to end through the key bucket,
and the audit log of every stream (exactly once, hash-chained, tamper-evident, tenant-scoped)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid

import grpc
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmstudio.auth import Principal, hash_secret
from llmstudio.bus import APIKEY_BUCKET, Bus
from llmstudio.config import Settings
from llmstudio.events import DatasetRegistered, EvalFailed, JobQueued
from llmstudio.natsserver import free_port
from llmstudio.storage import LocalArtifactStore
from llmstudio.v1 import governance_pb2 as pb
from llmstudio.v1 import governance_pb2_grpc
from services.governance.anchor import CheckpointStore
from services.governance.app import BOOTSTRAP_BANNER, build
from services.governance.config import AuditAnchorSettings
from services.governance.core import canonical_json, verify_chain
from services.governance.handlers import audit_event
from services.governance.store import GovernanceStore
from services.governance.usecases import AuditLog, Checkpointer
from tests.support.harness import running

ADMIN = "lls_test-bootstrap-admin-secret-long-enough-for-32-bytes"


async def wait_for(check, timeout=10.0):
    """Poll an async `check` until it returns something truthy; return that."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


class Client:
    def __init__(self, port: int):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = governance_pb2_grpc.GovernanceServiceStub(self.channel)

    def call(self, method: str, request, key: str | None):
        metadata = [("x-api-key", key)] if key else []
        return getattr(self.stub, method)(request, metadata=metadata, timeout=10)

    async def code(self, method: str, request, key: str | None) -> grpc.StatusCode:
        try:
            await self.call(method, request, key)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def audit(self, key: str = ADMIN, **query) -> list[pb.AuditRecord]:
        return list((await self.call("QueryAudit", pb.QueryAuditRequest(**query), key)).records)

    async def close(self):
        await self.channel.close()


@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                    bootstrap_admin_key=ADMIN, max_deliver=3, ack_wait_s=5)


async def test_api_keys_issue_use_revoke_and_tenant_scoped_audit(settings):
    async with running("governance", build, settings) as port:
        c = Client(port)
        me = await c.call("WhoAmI", pb.WhoAmIRequest(), ADMIN)
        assert (me.tenant, list(me.roles), me.name) == ("default", ["admin"], "bootstrap-admin")
        assert me.key_id.startswith("key-") and len(me.key_id) == 12
        assert await c.code("WhoAmI", pb.WhoAmIRequest(), None) == grpc.StatusCode.UNAUTHENTICATED
        assert await c.code("WhoAmI", pb.WhoAmIRequest(), "lls_wrong") == \
            grpc.StatusCode.UNAUTHENTICATED

        viewer = await c.call(
            "CreateApiKey", pb.CreateApiKeyRequest(role="viewer", name="ci"), ADMIN)
        assert viewer.secret.startswith("lls_") and viewer.key_id.startswith("key-")
        assert (viewer.principal.tenant, list(viewer.principal.roles)) == ("default", ["viewer"])
        who = await wait_for(lambda: _whoami_or_none(c, viewer.secret), timeout=5)
        assert (who.key_id, who.name) == (viewer.key_id, "ci")

        # the bucket every other service reads holds the key's hash -> principal, never the secret
        nc = await nats.connect(settings.nats_url)
        kv = await nc.jetstream().key_value(APIKEY_BUCKET)
        entry = await kv.get(hash_secret(viewer.secret))
        assert Principal.from_json(entry.value) == Principal(
            viewer.key_id, "default", ("viewer",), "ci")

        assert await c.code("CreateApiKey", pb.CreateApiKeyRequest(role="viewer"), viewer.secret) \
            == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await c.call("CreateApiKey", pb.CreateApiKeyRequest(role="owner"), ADMIN)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.details().startswith("role:")

        dev = await c.call("CreateApiKey", pb.CreateApiKeyRequest(role="developer", tenant="acme"),
                           ADMIN)
        assert dev.principal.tenant == "acme"

        assert (await c.call("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=viewer.key_id),
                             ADMIN)).revoked
        await wait_for(lambda: _is_unauthenticated(c, viewer.secret), timeout=5)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(hash_secret(viewer.secret))
        await nc.close()
        assert await c.code("RevokeApiKey", pb.RevokeApiKeyRequest(key_id="key-00000000"), ADMIN) \
            == grpc.StatusCode.NOT_FOUND
        assert await c.code("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=me.key_id), ADMIN) \
            == grpc.StatusCode.FAILED_PRECONDITION  # the last admin: nobody could issue keys

        # every key change is audited with who did it; a non-admin sees only its own tenant
        async def key_events():
            records = await c.audit(event_type_prefix="llmstudio.governance.apikey_")
            return records if len(records) == 4 else None

        records = await wait_for(key_events)
        assert [(r.event_type.split(".")[2], r.subject, r.actor) for r in records] == [
            ("apikey_created", me.key_id, "governance"),
            ("apikey_created", viewer.key_id, me.key_id),
            ("apikey_created", dev.key_id, me.key_id),
            ("apikey_revoked", viewer.key_id, me.key_id),
        ]
        assert "secret" not in records[1].data_json and viewer.secret not in records[1].data_json
        # so are the calls refused for their key (one record per caller and interval)
        refused = await wait_for(lambda: c.audit(
            event_type_prefix="llmstudio.governance.auth_failed"))
        assert json.loads(refused[0].data_json)["code"] == "UNAUTHENTICATED"
        # audit reads are admin-only (a tenant admin's scope: tests/security/test_scoped_admin)
        assert await c.code("QueryAudit", pb.QueryAuditRequest(), dev.secret) == \
            grpc.StatusCode.PERMISSION_DENIED
        await c.close()


async def _whoami_or_none(c: Client, key: str):
    try:
        return await c.call("WhoAmI", pb.WhoAmIRequest(), key)
    except grpc.aio.AioRpcError:
        return None


async def _is_unauthenticated(c: Client, key: str) -> bool:
    return await c.code("WhoAmI", pb.WhoAmIRequest(), key) == grpc.StatusCode.UNAUTHENTICATED


async def test_audit_log_exactly_once_chained_tamper_evident_and_kept_across_restart(settings):
    publisher = Bus(settings, "tester")
    async with running("governance", build, settings) as port:
        c = Client(port)
        await publisher.start()
        queued = await publisher.publish(JobQueued(job_id="job-1", dataset_sha256="ab"),
                                         tenant="acme", actor="key-dev")
        registered = await publisher.publish(
            DatasetRegistered(dataset_id="ds-1", name="rev", sha256="cd", format="jsonl",
                              num_rows=3, train_rows=2, validation_rows=1, artifacts={}),
            tenant="acme")
        failed = await publisher.publish(
            EvalFailed(evaluation_id="ev-1", job_id="job-1", reason="OOM"), tenant="beta")
        # a redelivery after the dedup window: same envelope, a new Nats-Msg-Id
        await publisher.js.publish("llmstudio.job.queued.job-1", queued.model_dump_json().encode(),
                                   headers={"Nats-Msg-Id": uuid.uuid4().hex})
        # a poison message: parked by the audit consumer, and the parking is itself audited
        bad = {"specversion": "1.0", "id": "bad-1", "type": "llmstudio.job.queued.v1",
               "source": "evil", "subject": "x", "tenant": "acme", "data": {"job_id": "x"}}
        await publisher.js.publish("llmstudio.job.x", json.dumps(bad).encode())

        async def all_arrived():
            records = await c.audit()
            types = [r.event_type for r in records]
            return records if "llmstudio.deadletter.parked.v1" in types and len(records) >= 5 \
                else None

        await wait_for(all_arrived)
        await asyncio.sleep(1.0)  # let any duplicate land before counting
        records = await c.audit()
        ids = [r.event_id for r in records]
        assert len(ids) == len(set(ids)) == 5
        assert {queued.id, registered.id, failed.id} <= set(ids) and "bad-1" not in ids
        assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
        assert records[0].prev_hash == "0" * 64
        assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:], strict=False))

        job = next(r for r in records if r.event_id == queued.id)
        assert (job.subject, job.tenant, job.actor, job.source) == ("job-1", "acme", "key-dev",
                                                                     "tester")
        assert job.data_json == canonical_json(queued.data)
        assert len(job.trace_id) == 32 and job.trace_id != "0" * 32
        parked = next(r for r in records if r.event_type == "llmstudio.deadletter.parked.v1")
        parked_data = json.loads(parked.data_json)
        assert parked_data["original_subject"] == "llmstudio.job.x"
        assert parked_data["consumer"] == "governance-audit-jobs"
        assert "dataset_sha256" in parked_data["reason"]

        # filters
        job_records = await c.audit(event_type_prefix="llmstudio.job.")
        assert [r.event_id for r in job_records] == [queued.id]
        assert [r.event_id for r in await c.audit(subject="ev-1")] == [failed.id]
        assert [r.sequence for r in await c.audit(after_sequence=2, limit=2)] == [3, 4]

        verified = await c.call("VerifyAudit", pb.VerifyAuditRequest(), ADMIN)
        assert (verified.ok, verified.records, verified.first_bad_sequence) == (True, 5, 0)
        assert verified.head_hash == records[-1].hash

        db = settings.data_dir / "governance.db"
        with sqlite3.connect(db) as conn:  # the NATS subject each event travelled on
            subjects = dict(conn.execute("SELECT event_id, subject FROM governance_audit_log"))
        assert subjects[queued.id] == "llmstudio.job.queued.job-1"
        assert subjects[parked.event_id] == "llmstudio.deadletter.governance-audit-jobs"

        # tamper with one stored record
        k = job.sequence
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE governance_audit_log SET data_json = ? WHERE sequence = ?",
                         ('{"dataset_sha256":"ff","job_id":"job-1"}', k))
        broken = await c.call("VerifyAudit", pb.VerifyAuditRequest(), ADMIN)
        assert (broken.ok, broken.first_bad_sequence, broken.records) == (False, k, 5)
        assert "edited" in broken.reason
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE governance_audit_log SET data_json = ? WHERE sequence = ?",
                         (job.data_json, k))
        assert (await c.call("VerifyAudit", pb.VerifyAuditRequest(), ADMIN)).ok
        await c.close()

    # restart: the same chain goes on, and no second bootstrap key is made
    async with running("governance", build, settings) as port:
        c = Client(port)
        later = await publisher.publish(JobQueued(job_id="job-2", dataset_sha256="ee"),
                                        tenant="acme")

        async def appended():
            return await c.audit(after_sequence=5)

        (record,) = await wait_for(appended)
        assert (record.event_id, record.sequence, record.prev_hash) == (
            later.id, 6, records[-1].hash)
        verified = await c.call("VerifyAudit", pb.VerifyAuditRequest(), ADMIN)
        assert (verified.ok, verified.records, verified.head_hash) == (True, 6, record.hash)
        await c.close()
    await publisher.stop()
    with sqlite3.connect(settings.data_dir / "governance.db") as conn:
        assert conn.execute("SELECT count(*) FROM governance_api_keys").fetchone() == (1,)


async def test_generated_bootstrap_key_is_printed_once_and_works(settings, capsys):
    settings = settings.model_copy(update={"bootstrap_admin_key": ""})
    async with running("governance", build, settings) as port:
        lines = [ln for ln in capsys.readouterr().out.splitlines()
                 if ln.startswith(BOOTSTRAP_BANNER)]
        assert len(lines) == 1
        secret = lines[0][len(BOOTSTRAP_BANNER):]
        assert secret.startswith("lls_") and len(secret) > 40
        c = Client(port)
        me = await c.call("WhoAmI", pb.WhoAmIRequest(), secret)
        assert list(me.roles) == ["admin"]
        await c.close()
    async with running("governance", build, settings) as port:
        assert BOOTSTRAP_BANNER not in capsys.readouterr().out
        c = Client(port)
        assert (await c.call("WhoAmI", pb.WhoAmIRequest(), secret)).tenant == "default"
        await c.close()
    with sqlite3.connect(settings.data_dir / "governance.db") as conn:
        stored = conn.execute("SELECT key_hash FROM governance_api_keys").fetchall()
    assert stored == [(hash_secret(secret),)]  # only the hash is kept


# -- the store on its own: concurrent appends stay one chain, on SQLite and PostgreSQL ----------


async def test_concurrent_appends_form_one_chain_and_skip_known_ids(db_url, tmp_path):
    from llmstudio.events import make_envelope

    store = GovernanceStore(db_url)
    store.migrate()
    try:
        log = AuditLog(store, Checkpointer(
            store, CheckpointStore(LocalArtifactStore(tmp_path / "artifacts")),
            Ed25519PrivateKey.generate(), AuditAnchorSettings()))
        envs = [make_envelope(JobQueued(job_id=f"job-{i}", dataset_sha256="ab"),
                              source="t", tenant="acme") for i in range(30)]
        events = [audit_event(env, JobQueued(**env.data)) for env in envs]
        results = await asyncio.gather(*(log.append(e) for e in events + events[:10]))
        assert sum(r is not None for r in results) == 30
        assert sorted(r.sequence for r in results if r) == list(range(1, 31))
        assert (await log.verify(Principal("key-admin", "default", ("admin",)))).ok
        with store.unit() as u:
            result = verify_chain(u.iter_audit(batch=7))  # batch edges are seamless
            assert (result.ok, result.records) == (True, 30)
            assert {r.event_id for r in u.iter_audit()} == {env.id for env in envs}
    finally:
        store.dispose()

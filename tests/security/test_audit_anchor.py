"""The audit chain anchored outside the database, tried as someone who can write governance's
database would try to hide what happened: a real governance server on real NATS, its signed
checkpoints in a real S3 server (`weed mini`). Every kind of tampering is detected and the first
bad sequence number named, including the two the hash chain alone cannot see (a cut tail, and a
suffix rewritten with consistent hashes)."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from dataclasses import asdict, replace

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import AuditCheckpointed, JobQueued, decode
from llmstudio.natsserver import free_port
from llmstudio.storage import artifact_store_from_settings
from llmstudio.v1 import governance_pb2 as pb
from llmstudio.v1 import governance_pb2_grpc
from services.governance.app import build
from services.governance.core import GENESIS_HASH, AuditRecord, record_hash, verify_chain
from tests.support.bus import all_stream_messages
from tests.support.harness import running
from tests.support.seaweed import seaweed_s3

ADMIN = "lls_test-bootstrap-admin-secret-long-enough-for-32-bytes"
EVERY = 4  # records per checkpoint
ANCHORED = 12  # the bootstrap key's record and 11 jobs: three checkpoints
COLUMNS = ("sequence", "event_id", "event_type", "subject", "entity", "source", "tenant",
           "actor", "time", "data_json", "trace_id", "prev_hash", "hash")


@pytest.fixture(scope="module")
def weed_endpoint(tmp_path_factory):
    with seaweed_s3(tmp_path_factory.mktemp("weed")) as ep:
        yield ep


@pytest.fixture
def settings(nats_server, tmp_path, weed_endpoint, monkeypatch, request):
    monkeypatch.setenv("LLMSTUDIO_AUDIT_CHECKPOINT_EVERY_RECORDS", str(EVERY))
    ep = weed_endpoint
    bucket = "audit-" + request.node.name.replace("_", "-")[5:40].lower().strip("-")
    return Settings(nats_url=nats_server.url, data_dir=tmp_path, grpc_port=free_port(),
                    bootstrap_admin_key=ADMIN, max_deliver=3, ack_wait_s=5,
                    artifact_store="s3", s3_endpoint=f"http://{ep.endpoint}",
                    s3_access_key=ep.access_key, s3_secret_key=ep.secret_key, s3_bucket=bucket)


async def verify(stub) -> pb.VerifyAuditResponse:
    return await stub.VerifyAudit(pb.VerifyAuditRequest(), metadata=[("x-api-key", ADMIN)],
                                  timeout=10)


async def poll(check, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)
    return result


class Log:
    """Governance's SQLite database, as a tamperer with write access sees it."""

    def __init__(self, path):
        self.path = path
        self.original = self.rows()

    def rows(self) -> list[AuditRecord]:
        with sqlite3.connect(self.path) as conn:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM governance_audit_log "
                                "ORDER BY sequence").fetchall()
        return [AuditRecord(**dict(zip(COLUMNS, row, strict=True))) for row in rows]

    def write(self, records: list[AuditRecord]) -> None:
        """Replace the whole log with `records`, in one transaction."""
        with sqlite3.connect(self.path) as conn:
            conn.execute("DELETE FROM governance_audit_log")
            conn.executemany(
                f"INSERT INTO governance_audit_log ({', '.join(COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(COLUMNS))})",
                [tuple(asdict(r)[c] for c in COLUMNS) for r in records])

    def restore(self) -> None:
        self.write(self.original)


def rechained(records: list[AuditRecord], start: int) -> list[AuditRecord]:
    """`records` renumbered from 1 with every hash from position `start` recomputed: the
    chain holds on its own, as a careful tamperer would leave it."""
    out: list[AuditRecord] = []
    for i, record in enumerate(records, 1):
        if i < start:
            out.append(record)
            continue
        fields = {**asdict(record), "sequence": i,
                  "prev_hash": out[-1].hash if out else GENESIS_HASH}
        out.append(AuditRecord(**{**fields, "hash": record_hash(fields)}))
    return out


def edited(record: AuditRecord, job_id: str) -> AuditRecord:
    data = {**json.loads(record.data_json), "job_id": job_id}
    return replace(record, data_json=json.dumps(data, sort_keys=True, separators=(",", ":")))


async def test_every_tampering_is_detected_with_the_first_bad_sequence(settings):
    publisher = Bus(settings, "tester")
    async with running("governance", build, settings) as port:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = governance_pb2_grpc.GovernanceServiceStub(channel)
        await publisher.start()
        for i in range(ANCHORED - 1):
            await publisher.publish(JobQueued(job_id=f"job-{i}", dataset_sha256="ab"),
                                    tenant="acme")

        async def anchored():
            r = await verify(stub)
            return r if r.anchored_records == ANCHORED else None

        clean = await poll(anchored)
        assert (clean.ok, clean.records, clean.checkpoint_seq) == (True, ANCHORED, 3)

        # the anchors: append-only names outside the database, each signed by the key
        # governance published beside them (an auditor needs nothing else to check them)
        store = artifact_store_from_settings(settings)
        names = store.list("audit/checkpoints/")
        assert names == [f"audit/checkpoints/{n:012d}.json" for n in (1, 2, 3)]
        (key_name,) = store.list("audit/keys/")
        public_key = load_pem_public_key(store.get_bytes(key_name))
        log = Log(settings.data_dir / "governance.db")
        hashes = []
        for n, name in enumerate(names, 1):
            checkpoint = json.loads(store.get_bytes(name))
            signature = base64.b64decode(checkpoint.pop("signature"))
            public_key.verify(signature, json.dumps(
                checkpoint, sort_keys=True, separators=(",", ":")).encode())
            assert (checkpoint["seq"], checkpoint["records"]) == (n, n * EVERY)
            hashes += checkpoint["hashes"]
        assert hashes == [r.hash for r in log.original]

        k = 6
        rows = log.original
        cases = {
            # one record's data changed, its stored hash left as it was
            "edit": (rows[:k - 1] + [edited(rows[k - 1], "forged")] + rows[k:], "edited"),
            "delete": (rows[:k - 1] + rows[k:], "deleted"),
            # a forged record slipped in at k, everything after renumbered and re-hashed
            "insert": (rechained(rows[:k - 1] + [replace(edited(rows[k - 1], "forged"),
                                                         event_id="forged-1")] + rows[k - 1:],
                                 k), "anchored"),
            # records k and k+1 swap places (their sequence numbers stay in order)
            "reorder": ([*rows[:k - 1],
                         replace(rows[k], sequence=k), replace(rows[k - 1], sequence=k + 1),
                         *rows[k + 1:]], "anchored"),
            "tail truncation": (rows[:9], "tail truncated"),
            # every record from k on rewritten with consistent hashes
            "suffix rewrite": (rechained(rows[:k - 1] + [edited(r, "forged") for r in rows[k - 1:]],
                                         k), "anchored"),
        }
        # a deletion is named at the first record out of place (the reason names the gap)
        first_bad = {"delete": k + 1, "tail truncation": 10}
        for case, (tampered, why) in cases.items():
            log.write(tampered)
            broken = await verify(stub)
            assert (broken.ok, broken.first_bad_sequence) == (False, first_bad.get(case, k)), case
            assert why in broken.reason, (case, broken.reason)
            log.restore()
        # the two the chain alone cannot see
        for case in ("tail truncation", "suffix rewrite"):
            assert verify_chain(cases[case][0]).ok, case
        assert (await verify(stub)).ok

        # the anchors themselves: one altered in the store, then the newest one removed
        original = store.get_bytes(names[1])
        altered = json.loads(original)
        altered["hashes"][0] = "0" * 64
        store.put_bytes(names[1], json.dumps(altered).encode())
        broken = await verify(stub)
        assert (broken.ok, broken.first_bad_sequence) == (False, EVERY + 1)
        assert "checkpoint 2: signature does not verify" in broken.reason
        store.put_bytes(names[1], original)
        assert (await verify(stub)).ok
        store.delete_prefix(names[2])
        broken = await verify(stub)
        assert (broken.ok, broken.checkpoint_seq) == (False, 2)
        assert "checkpoint 3 was written but is missing" in broken.reason
        await channel.close()
    await publisher.stop()


async def test_a_checkpoint_comes_by_time_and_restarts_continue_the_sequence(
        settings, monkeypatch):
    monkeypatch.setenv("LLMSTUDIO_AUDIT_CHECKPOINT_EVERY_RECORDS", "1000")  # never by count
    monkeypatch.setenv("LLMSTUDIO_AUDIT_CHECKPOINT_EVERY_S", "0.5")
    publisher = Bus(settings, "tester")
    store = artifact_store_from_settings(settings)
    await publisher.start()
    written = {}
    for run, (jobs, records) in enumerate(((2, 3), (1, 4)), 1):  # the bootstrap key's record
        async with running("governance", build, settings) as port:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stub = governance_pb2_grpc.GovernanceServiceStub(channel)
            for i in range(jobs):
                await publisher.publish(JobQueued(job_id=f"job-{run}-{i}", dataset_sha256="ab"),
                                        tenant="acme")

            async def anchored(stub=stub, records=records):
                r = await verify(stub)
                return r if r.anchored_records == records else None

            assert (await poll(anchored)).ok
            await channel.close()
        if run == 1:
            written = {n: store.get_bytes(n) for n in store.list("audit/checkpoints/")}
    # the restart numbered on after the checkpoints it found and rewrote none of them
    names = store.list("audit/checkpoints/")
    assert names == [f"audit/checkpoints/{n:012d}.json" for n in range(1, len(names) + 1)]
    assert {n: store.get_bytes(n) for n in written} == written
    (last,) = (json.loads(store.get_bytes(n)) for n in names if n not in written)
    assert (last["first_sequence"], last["records"], last["seq"]) == (4, 4, len(written) + 1)
    # each checkpoint was announced once (stream AUDIT, outside the chain it anchors)
    announced = [decode(m.data)[1] for m in
                 await all_stream_messages(settings.nats_url, "llmstudio.audit.>")]
    assert [(a.object_key, a.records) for a in announced] == [
        (n, json.loads(store.get_bytes(n))["records"]) for n in names]
    assert all(isinstance(a, AuditCheckpointed) for a in announced)
    assert announced[-1].head_hash == last["hashes"][-1]
    await publisher.stop()

"""Two scheduler replicas on one bus and one database: one places jobs (the lease holder), both
serve every RPC and WatchJob, and the other takes placement over when the leader stops."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from llmstudio.bus import LEASE_BUCKET as BUCKET
from llmstudio.config import Settings
from llmstudio.events import JobAssigned, JobCancelled, WorkItem
from llmstudio.natsserver import free_port
from llmstudio.v1 import jobs_pb2 as pb
from llmstudio.v1 import jobs_pb2_grpc
from services.scheduler.app import build
from services.scheduler.lease import KEY
from tests.integration.test_scheduler_service import (
    TENANT,
    Peers,
    create,
    eventually,
    md,
    validate,
    wait_status,
    watching,
)
from tests.support.harness import put_api_key, running

LEASE_TTL_S = 1.0


def replica_settings(nats_url: str, tmp_path, name: str) -> Settings:
    return Settings(nats_url=nats_url, data_dir=tmp_path / name, grpc_port=free_port(),
                    database_url=f"sqlite:///{tmp_path / 'scheduler.db'}", worker_ttl_s=1.0,
                    scheduler_lease_ttl_s=LEASE_TTL_S, replica_id=name, max_deliver=3,
                    ack_wait_s=5)


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny-model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


async def test_one_replica_places_both_serve_and_the_other_takes_over(
        nats_server, tmp_path, model_dir):
    dev = await put_api_key(nats_server.url, "developer", TENANT)
    a = replica_settings(nats_server.url, tmp_path, "replica-a")
    b = replica_settings(nats_server.url, tmp_path, "replica-b")
    async with contextlib.AsyncExitStack() as replica_a:
        port_a = await replica_a.enter_async_context(running("scheduler", build, a))
        async with contextlib.AsyncExitStack() as stack:
            port_b = await stack.enter_async_context(running("scheduler", build, b))
            peers = await stack.enter_async_context(Peers(b))
            via_a = jobs_pb2_grpc.JobServiceStub(await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{port_a}")))
            via_b = jobs_pb2_grpc.JobServiceStub(await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{port_b}")))
            kv = await peers.bus.js.key_value(BUCKET)

            async def leader() -> str:
                return (await kv.get(KEY)).value.decode()

            assert await leader() == "replica-a"  # it started first

            # submitted on one replica, watched on the other: every update reaches the watcher
            job = await create(via_a, dev, model_dir)
            watcher, updates = await watching(via_b, dev, job.id)
            await validate(peers, job.id)
            peers.workers["w-1"] = "idle"
            await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-1")
            got = await via_b.GetJob(pb.GetJobRequest(id=job.id), metadata=md(dev))
            assert got.worker_id == "w-1"
            await asyncio.sleep(1.0)  # both replicas run: the job was placed once
            assert peers.count(WorkItem, job_id=job.id) == 1
            assert peers.count(JobAssigned, job_id=job.id) == 1
            await via_b.CancelJob(pb.CancelJobRequest(id=job.id), metadata=md(dev))
            await peers.publish(JobCancelled(job_id=job.id, reason="cancelled"))  # the worker
            await asyncio.wait_for(watcher, 10)
            statuses = [pb.JobStatus.Name(u.job.status) for u in updates if u.kind == "status"]
            assert statuses == ["JOB_STATUS_VALIDATING_FILES", "JOB_STATUS_QUEUED",
                                "JOB_STATUS_CANCELLED"]

            # the leader stops: the other holds the lease within two TTLs and places jobs
            await replica_a.aclose()
            await eventually(lambda: _is(leader, "replica-b"), timeout=2 * LEASE_TTL_S + 1)
            second = await create(via_b, dev, model_dir)
            await validate(peers, second.id)
            await peers.wait_for(WorkItem, job_id=second.id, worker_id="w-1", timeout=5)
            await wait_status(via_b, dev, second.id, pb.JOB_STATUS_QUEUED)
            assert peers.count(WorkItem, job_id=second.id) == 1


async def _is(read, expected: str) -> bool:
    try:
        return await read() == expected
    except Exception:  # noqa: BLE001 - the key between its expiry and its next holder
        return False


def test_replicas_starting_together_migrate_one_after_the_other(db_url):
    """Two processes' worth of stores migrating one database at once: both succeed, at head."""
    import threading

    from llmstudio.migrations import current_revision
    from services.scheduler.store import SchedulerStore

    stores = [SchedulerStore(db_url) for _ in range(4)]
    errors: list[BaseException] = []

    def migrate(store: SchedulerStore) -> None:
        try:
            store.migrate()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert current_revision(stores[0].engine, "scheduler") == "0006"
    for s in stores:
        s.dispose()

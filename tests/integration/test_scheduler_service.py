"""The scheduler against a real nats-server, over real gRPC: the job flow from submit to
completion, placement in the job's trace, watch, cancel, rejection, lost workers; its store on
SQLite and on PostgreSQL (where one runs at 127.0.0.1:5432)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from dataclasses import dataclass

import grpc
import nats
import pytest
from google.protobuf.struct_pb2 import Struct
from sqlalchemy.exc import IntegrityError

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import (
    DatasetRejected,
    DatasetValidated,
    EventData,
    InvalidEvent,
    JobAssigned,
    JobCancelled,
    JobCancelRequested,
    JobCheckpointed,
    JobCompleted,
    JobFailed,
    JobMetrics,
    JobPaused,
    JobReleased,
    JobReleaseRequested,
    JobRequeued,
    JobResumed,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    QuotaChanged,
    WorkerHeartbeat,
    WorkItem,
    decode,
)
from llmstudio.natsserver import free_port
from llmstudio.v1 import jobs_pb2 as pb
from llmstudio.v1 import jobs_pb2_grpc
from services.scheduler.app import build
from services.scheduler.core import Job, Status, now_iso
from services.scheduler.store import Conflict, SchedulerStore
from tests.support.harness import put_api_key, running

TENANT = "acme"
SHA = "ab" * 32


def artifacts(tenant: str) -> dict[str, str]:
    return {split: f"tenants/{tenant}/datasets/{SHA}/{split}.jsonl"
            for split in ("train", "validation")}


ARTIFACTS = artifacts(TENANT)
CK3 = f"tenants/{TENANT}/jobs/x/checkpoint-3"
CK9 = f"tenants/{TENANT}/jobs/x/checkpoint-9"


# -- test-side peers: a bus tap, a publisher for the other services, heartbeating workers -------

@dataclass
class Seen:
    subject: str
    headers: dict[str, str]
    tenant: str
    data: EventData

    @property
    def trace_id(self) -> str:
        return self.headers.get("traceparent", "---").split("-")[1]


class Peers:
    """What the dataset service and the workers would do, and a tap on every bus message."""

    def __init__(self, settings: Settings):
        self.bus = Bus(settings, "peers")
        self.seen: list[Seen] = []
        self.workers: dict[str, str] = {}  # worker id -> state it heartbeats
        self.running: dict[str, str] = {}  # worker id -> the job it says it runs (when busy)
        self.hardware: dict[str, dict] = {}  # worker id -> device, memory_bytes, bf16 it reports
        self._nc = None
        self._beating: asyncio.Task | None = None

    async def __aenter__(self) -> Peers:
        await self.bus.start()
        self._nc = await nats.connect(self.bus.settings.nats_url)
        await self._nc.subscribe("llmstudio.>", cb=self._record)
        self._beating = asyncio.create_task(self._heartbeats())
        return self

    async def __aexit__(self, *exc) -> None:
        self._beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._beating
        await self._nc.close()
        await self.bus.stop()

    async def _record(self, msg) -> None:
        try:
            env, data = decode(msg.data)
        except InvalidEvent:
            return
        self.seen.append(Seen(msg.subject, dict(msg.headers or {}), env.tenant, data))

    async def _heartbeats(self) -> None:
        while True:
            for worker_id, state in list(self.workers.items()):
                await self.bus.publish_core(WorkerHeartbeat(
                    worker_id=worker_id, state=state, job_id=self.running.get(worker_id, ""),
                    **self.hardware.get(worker_id, {})))
            await asyncio.sleep(0.2)

    def runs(self, worker_id: str, job_id: str) -> None:
        """`worker_id` heartbeats busy with `job_id` from now on."""
        self.workers[worker_id] = "busy"
        self.running[worker_id] = job_id

    async def publish(self, data: EventData, tenant: str = TENANT) -> None:
        await self.bus.publish(data, tenant=tenant, actor="peer")

    async def wait_for(self, kind: type[EventData], timeout: float = 10.0, **fields) -> Seen:
        def match(s: Seen) -> bool:
            return isinstance(s.data, kind) and all(
                getattr(s.data, k) == v for k, v in fields.items())

        await eventually(lambda: any(match(s) for s in self.seen), timeout)
        return next(s for s in self.seen if match(s))

    def count(self, kind: type[EventData], **fields) -> int:
        return sum(
            1 for s in self.seen
            if isinstance(s.data, kind) and all(getattr(s.data, k) == v for k, v in fields.items())
        )


async def eventually(pred, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def settings(nats_server, tmp_path):
    return Settings(nats_url=nats_server.url, data_dir=tmp_path / "data", grpc_port=free_port(),
                    worker_ttl_s=1.0, max_deliver=3, ack_wait_s=5)


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny-model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


@pytest.fixture
async def env(settings):
    """(stub, keys by role, peers) with the scheduler running."""
    keys = {role: await put_api_key(settings.nats_url, role, TENANT)
            for role in ("developer", "viewer", "admin")}
    keys["other-tenant"] = await put_api_key(settings.nats_url, "developer", "globex")
    keys["other-admin"] = await put_api_key(settings.nats_url, "admin", "globex")
    keys["platform-admin"] = await put_api_key(settings.nats_url, "admin", "default")
    async with running("scheduler", build, settings) as port, Peers(settings) as peers:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield jobs_pb2_grpc.JobServiceStub(channel), keys, peers


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def struct(d: dict) -> Struct:
    s = Struct()
    s.update(d)
    return s


def spec(model_dir, **overrides) -> dict:
    return {"base_model": str(model_dir), "dataset": "ds-1",
            "hyperparameters": {"max_steps": 3, "learning_rate": 1e-3}, **overrides}


async def create(stub, key: str, model_dir, priority: str = "", **overrides) -> pb.Job:
    return await stub.CreateJob(
        pb.CreateJobRequest(spec=struct(spec(model_dir, **overrides)), priority_class=priority),
        metadata=md(key))


async def status_of(stub, key: str, job_id: str) -> int:
    return (await stub.GetJob(pb.GetJobRequest(id=job_id), metadata=md(key))).status


async def wait_status(stub, key: str, job_id: str, status: int, timeout: float = 10.0) -> pb.Job:
    async def reached():
        job = await stub.GetJob(pb.GetJobRequest(id=job_id), metadata=md(key))
        return job if job.status == status else None

    return await eventually(reached, timeout)


async def watching(stub, key: str, job_id: str) -> tuple[asyncio.Task, list[pb.JobUpdate]]:
    """A WatchJob in the background, once its first update came: (its task, its updates)."""
    updates: list[pb.JobUpdate] = []

    async def watch():
        async for update in stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=md(key)):
            updates.append(update)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: updates)
    return watcher, updates


async def validate(peers: Peers, job_id: str, tenant: str = TENANT) -> None:
    await peers.publish(DatasetValidated(job_id=job_id, dataset_id="ds-1", sha256=SHA,
                                         artifacts=artifacts(tenant)), tenant=tenant)


# -- the job flow -------------------------------------------------------------------------------

async def test_job_flows_from_submit_to_success_in_one_trace(env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]

    job = await create(stub, dev, model_dir, priority="high")
    assert job.status == pb.JOB_STATUS_VALIDATING_FILES
    assert job.id.startswith("job-") and len(job.id) == 16
    assert job.model_name == "tiny-model-lora" and job.tenant == TENANT
    assert (job.priority_class, job.priority) == ("high", 2)
    assert len(job.trace_id) == 32 and job.created_by.startswith("key-")
    assert job.spec["hyperparameters"]["max_steps"] == 3
    assert job.spec["base_model"] == str(model_dir.resolve())

    submitted = await peers.wait_for(JobSubmitted, job_id=job.id)
    assert submitted.tenant == TENANT and submitted.trace_id == job.trace_id
    assert submitted.data.dataset_id == "ds-1" and submitted.data.priority_class == "high"
    assert submitted.data.spec["hyperparameters"]["max_steps"] == 3  # an int again, defaults in
    assert submitted.data.spec["lora"]["r"] == 8

    watcher, updates = await watching(stub, dev, job.id)

    await validate(peers, job.id)
    queued = await wait_status(stub, dev, job.id, pb.JOB_STATUS_QUEUED)
    assert queued.dataset_sha256 == SHA and queued.worker_id == ""

    peers.workers["w-1"] = "idle"
    work = await peers.wait_for(WorkItem, job_id=job.id)
    assert work.subject == "llmstudio.work.w-1"
    assert work.trace_id == job.trace_id  # the trainer's spans join the job's trace
    assert work.data.attempt == 1 and work.data.dataset_sha256 == SHA
    assert work.data.dataset_artifacts == ARTIFACTS and work.data.model_name == "tiny-model-lora"
    assert work.data.spec == submitted.data.spec
    assigned = await peers.wait_for(JobAssigned, job_id=job.id)
    assert assigned.data.worker_id == "w-1" and assigned.trace_id == job.trace_id
    assert (await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md(dev))).worker_id == "w-1"

    peers.runs("w-1", job.id)
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-1"))
    await wait_status(stub, dev, job.id, pb.JOB_STATUS_RUNNING)
    for step, loss in [(1, 2.5), (2, 2.0), (3, 1.5)]:
        await peers.publish(JobMetrics(job_id=job.id, step=step, max_steps=3, loss=loss,
                                       learning_rate=1e-3, tokens_per_s=100.0))
    await peers.publish(JobCheckpointed(job_id=job.id, step=3, checkpoint_key=CK3))

    async def latest_step():
        j = await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md(dev))
        return j.metrics.get("step") == 3 and j.artifacts.get("checkpoint") == CK3

    await eventually(latest_step)
    # Samples ride their own stream and may be handled out of order: wait for all three before
    # the job ends (the watch stream closes after the terminal status).
    await eventually(lambda: len([u for u in updates if u.kind == "metrics"]) == 3)
    await peers.publish(JobCompleted(
        job_id=job.id, worker_id="w-1", model_name="tiny-model-lora", spec=work.data.spec,
        dataset_id="ds-1", dataset_sha256=SHA, dataset_artifacts=ARTIFACTS,
        checkpoint_key=CK3, adapter_key=f"tenants/{TENANT}/jobs/x/adapter", steps=3, final_loss=1.5,
    ))
    await asyncio.wait_for(watcher, 10)  # the stream ends after the terminal status

    kinds = [(u.kind, pb.JobStatus.Name(u.job.status)) for u in updates if u.kind == "status"]
    assert kinds == [("status", "JOB_STATUS_VALIDATING_FILES"), ("status", "JOB_STATUS_QUEUED"),
                     ("status", "JOB_STATUS_RUNNING"), ("status", "JOB_STATUS_SUCCEEDED")]
    assert updates[-1].kind == "status" and updates[-1].job.status == pb.JOB_STATUS_SUCCEEDED
    metrics = [u for u in updates if u.kind == "metrics"]
    by_step = sorted((u.step, u.metrics["loss"]) for u in metrics)
    assert by_step == [(1, 2.5), (2, 2.0), (3, 1.5)]
    checkpoints = [u for u in updates if u.kind == "checkpoint"]
    assert [(u.step, u.message) for u in checkpoints] == [(3, CK3)]
    running_at = next(i for i, u in enumerate(updates) if u.job.status == pb.JOB_STATUS_RUNNING)
    assert all(i > running_at for i, u in enumerate(updates) if u.kind == "metrics")

    done = await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md(dev))
    assert done.status == pb.JOB_STATUS_SUCCEEDED
    # the accepted completion is announced once, in the job's trace, as its submitter's
    succeeded = await peers.wait_for(JobSucceeded, job_id=job.id)
    assert succeeded.trace_id == job.trace_id and succeeded.data.checkpoint_key == CK3
    assert peers.count(JobSucceeded, job_id=job.id) == 1
    assert [(a.attempt, a.worker_id, a.reason) for a in done.attempts] == [(1, "w-1", "completed")]
    assert dict(done.artifacts) == {"checkpoint": CK3,
                                    "adapter": f"tenants/{TENANT}/jobs/x/adapter"}
    assert done.metrics["final_loss"] == 1.5 and done.metrics["steps"] == 3
    assert done.metrics["tokens_per_s"] == 100.0

    # A watcher that comes later gets the whole story of the finished job, then the end.
    replay = [u async for u in stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=md(dev))]
    assert [u.kind for u in replay] == ["status", "metrics", "metrics", "metrics"]
    assert replay[0].job.status == pb.JOB_STATUS_SUCCEEDED

    # A late failure changes nothing. The JobCancelled after it, on the same consumer, shows
    # the late event was handled (in order) by the time the second job is cancelled.
    other = await create(stub, dev, model_dir)
    await peers.publish(JobFailed(job_id=job.id, reason="late", worker_id="w-1"))
    await peers.publish(JobCancelled(job_id=other.id, reason="by the worker"))
    await wait_status(stub, dev, other.id, pb.JOB_STATUS_CANCELLED)
    again = await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md(dev))
    assert again.status == pb.JOB_STATUS_SUCCEEDED and again.error == ""


async def test_bad_specs_auth_and_tenancy(env, model_dir, tmp_path):
    stub, keys, peers = env
    dev = keys["developer"]

    async def create_error(spec_dict: dict, key: str = dev) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateJob(pb.CreateJobRequest(spec=struct(spec_dict)), metadata=md(key))
        return e.value

    err = await create_error(spec(tmp_path / "no-such-model"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.base_model" in err.details() and "config.json missing" in err.details()
    (tmp_path / "not-a-model").mkdir()
    err = await create_error(spec(tmp_path / "not-a-model"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.base_model" in err.details()
    err = await create_error(spec(model_dir, hyperparameters={"learning_rate": -1}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("spec.hyperparameters.learning_rate:")
    err = await create_error(spec(model_dir, epochs=3))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.epochs" in err.details()
    err = await create_error({"base_model": "HuggingFaceTB/SmolLM2-135M"})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.dataset" in err.details()

    assert (await create_error(spec(model_dir), keys["viewer"])).code() == \
        grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateJob(pb.CreateJobRequest(spec=struct(spec(model_dir))))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await stub.ListJobs(pb.ListJobsRequest(), metadata=md(dev)) == pb.ListJobsResponse()

    # a hub id is accepted as is (workers with network load it)
    hub = await stub.CreateJob(pb.CreateJobRequest(spec=struct(
        {"base_model": "HuggingFaceTB/SmolLM2-135M", "dataset": "ds-1"})), metadata=md(dev))
    assert hub.model_name == "SmolLM2-135M-lora"

    # the same idempotency key gives back the same job, announced once
    req = pb.CreateJobRequest(spec=struct(spec(model_dir)), idempotency_key="k-1")
    first = await stub.CreateJob(req, metadata=md(dev))
    second = await stub.CreateJob(req, metadata=md(dev))
    assert first.id == second.id
    await peers.wait_for(JobSubmitted, job_id=first.id)
    await peers.wait_for(JobSubmitted, job_id=hub.id)
    assert peers.count(JobSubmitted) == 2

    # tenant-scoped reads; a viewer may read
    listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=md(keys["viewer"]))
    assert {j.id for j in listed.jobs} == {hub.id, first.id}
    await validate(peers, hub.id)
    await wait_status(stub, dev, hub.id, pb.JOB_STATUS_QUEUED)
    queued = await stub.ListJobs(pb.ListJobsRequest(status=pb.JOB_STATUS_QUEUED), metadata=md(dev))
    assert [j.id for j in queued.jobs] == [hub.id]
    other = md(keys["other-tenant"])
    assert (await stub.ListJobs(pb.ListJobsRequest(), metadata=other)).jobs == []
    for call in (stub.GetJob(pb.GetJobRequest(id=first.id), metadata=other),
                 stub.CancelJob(pb.CancelJobRequest(id=first.id), metadata=other)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stub.WatchJob(pb.WatchJobRequest(id=first.id), metadata=other):
            pass
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # another tenant's events don't touch the job
    marker = await create(stub, dev, model_dir)
    await peers.publish(DatasetRejected(ref=first.id, job_id=first.id, reason="x"), "globex")
    await peers.publish(DatasetRejected(ref=marker.id, job_id=marker.id, reason="x"), TENANT)
    await wait_status(stub, dev, marker.id, pb.JOB_STATUS_FAILED)  # same consumer, in order
    assert await status_of(stub, dev, first.id) == pb.JOB_STATUS_VALIDATING_FILES


async def test_cancel_and_rejection(env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]

    # not yet placed: cancelled at once
    validating = await create(stub, dev, model_dir)
    cancelled = await stub.CancelJob(pb.CancelJobRequest(id=validating.id), metadata=md(dev))
    assert cancelled.status == pb.JOB_STATUS_CANCELLED
    event = await peers.wait_for(JobCancelled, job_id=validating.id)
    assert event.data.reason.startswith("cancelled by key-")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CancelJob(pb.CancelJobRequest(id=validating.id), metadata=md(dev))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in e.value.details()
    queued = await create(stub, dev, model_dir)
    await validate(peers, queued.id)
    await wait_status(stub, dev, queued.id, pb.JOB_STATUS_QUEUED)
    assert (await stub.CancelJob(pb.CancelJobRequest(id=queued.id), metadata=md(dev))).status \
        == pb.JOB_STATUS_CANCELLED

    # a job whose dataset is unusable fails with the dataset service's reason
    rejected = await create(stub, dev, model_dir)
    await peers.publish(DatasetRejected(ref="upload-x", reason="not a job"))  # no job: ignored
    await peers.publish(DatasetRejected(ref=rejected.id, job_id=rejected.id,
                                        reason="sha256 mismatch", errors=["train.jsonl"]))
    failed = await wait_status(stub, dev, rejected.id, pb.JOB_STATUS_FAILED)
    assert failed.error == "sha256 mismatch: train.jsonl"
    announced = await peers.wait_for(JobFailed, job_id=rejected.id)
    assert announced.data.reason == failed.error

    # on a worker: the worker is asked to stop; its JobCancelled ends the job
    running_job = await create(stub, dev, model_dir)
    await validate(peers, running_job.id)
    peers.workers["w-run"] = "idle"
    await peers.wait_for(WorkItem, job_id=running_job.id)
    peers.runs("w-run", running_job.id)
    await peers.publish(JobStarted(job_id=running_job.id, worker_id="w-run"))
    await wait_status(stub, dev, running_job.id, pb.JOB_STATUS_RUNNING)
    answer = await stub.CancelJob(pb.CancelJobRequest(id=running_job.id), metadata=md(dev))
    assert answer.status == pb.JOB_STATUS_RUNNING
    request = await peers.wait_for(JobCancelRequested, job_id=running_job.id)
    assert request.data.worker_id == "w-run"
    await peers.publish(JobCancelled(job_id=running_job.id, reason="stopped at step 2"))
    await wait_status(stub, dev, running_job.id, pb.JOB_STATUS_CANCELLED)


async def test_jobs_leave_lost_workers(env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]

    # the flaky worker takes the job, then goes silent before starting it
    job = await create(stub, dev, model_dir, max_attempts=2)
    await validate(peers, job.id)
    peers.workers["w-flaky"] = "idle"
    await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-flaky")
    del peers.workers["w-flaky"]
    await asyncio.sleep(0.3)
    peers.workers["w-steady"] = "idle"
    second = await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-steady", timeout=10)
    assert second.data.attempt == 2 and second.trace_id == job.trace_id
    reassigned = await peers.wait_for(JobAssigned, job_id=job.id, attempt=2)
    assert reassigned.data.worker_id == "w-steady"
    requeued = await peers.wait_for(JobRequeued, job_id=job.id, attempt=2)
    assert requeued.data.worker_id == "w-flaky" and "w-flaky lost" in requeued.data.reason
    work = await peers.bus.js.stream_info("WORK", subjects_filter="llmstudio.work.>")
    assert work.state.subjects == {"llmstudio.work.w-steady": 1}  # the flaky one's was purged

    # the flaky worker's late report doesn't move the job, nor does an older attempt's report
    # from the steady worker; the steady worker's report of its own attempt does
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-flaky", attempt=1))
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-steady", attempt=1))
    await asyncio.sleep(0.3)
    assert await status_of(stub, dev, job.id) == pb.JOB_STATUS_QUEUED
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-steady", attempt=2,
                                   resumed_from_step=4))
    running_job = await wait_status(stub, dev, job.id, pb.JOB_STATUS_RUNNING)
    assert running_job.worker_id == "w-steady" and running_job.attempt == 2
    assert running_job.attempts[1].resumed_from_step == 4

    # a running job whose worker dies goes back to the queue (a lost attempt: 1 of 2)...
    peers.runs("w-steady", job.id)
    await asyncio.sleep(0.3)
    del peers.workers["w-steady"]
    await peers.wait_for(JobRequeued, job_id=job.id, attempt=3, timeout=10)
    again = await wait_status(stub, dev, job.id, pb.JOB_STATUS_QUEUED)
    assert again.attempt == 3 and again.worker_id == ""
    assert [(a.attempt, a.worker_id) for a in again.attempts] == [(1, "w-flaky"), (2, "w-steady")]
    assert again.attempts[1].reason.startswith("worker w-steady lost")
    # ...and one that loses its worker for the max_attempts-th time fails with its history
    peers.workers["w-last"] = "idle"
    await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-last", attempt=3)
    peers.runs("w-last", job.id)
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-last", attempt=3))
    await wait_status(stub, dev, job.id, pb.JOB_STATUS_RUNNING)
    del peers.workers["w-last"]
    failed = await wait_status(stub, dev, job.id, pb.JOB_STATUS_FAILED)
    assert failed.error.startswith("worker w-last lost")
    assert "2 of max_attempts 2 attempts lost" in failed.error
    assert "attempt 2 on w-steady: worker w-steady lost" in failed.error
    event = await peers.wait_for(JobFailed, job_id=job.id)
    assert event.data.worker_id == "w-last" and event.data.attempt == 3

    # cancelled on a worker that then vanishes before starting it: cancelled, not placed again
    doomed = await create(stub, dev, model_dir)
    await validate(peers, doomed.id)
    peers.workers["w-gone"] = "idle"
    await peers.wait_for(WorkItem, job_id=doomed.id, worker_id="w-gone")
    answer = await stub.CancelJob(pb.CancelJobRequest(id=doomed.id), metadata=md(dev))
    assert answer.status == pb.JOB_STATUS_QUEUED and answer.worker_id == "w-gone"
    await peers.wait_for(JobCancelRequested, job_id=doomed.id, worker_id="w-gone")
    del peers.workers["w-gone"]
    peers.workers["w-other"] = "idle"
    await wait_status(stub, dev, doomed.id, pb.JOB_STATUS_CANCELLED)
    await peers.wait_for(JobCancelled, job_id=doomed.id)
    await asyncio.sleep(0.5)
    assert peers.count(WorkItem, job_id=doomed.id) == 1


async def test_a_released_job_resumes_elsewhere_and_only_its_current_attempt_succeeds(
        env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]
    job = await create(stub, dev, model_dir, max_attempts=1)
    await validate(peers, job.id)
    peers.workers["w-1"] = "idle"
    first = await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-1")
    peers.runs("w-1", job.id)
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-1", attempt=1))
    await wait_status(stub, dev, job.id, pb.JOB_STATUS_RUNNING)

    # w-1 drains: a release of another attempt or worker changes nothing; its own requeues the
    # job without counting as a lost attempt (max_attempts 1 would fail it)
    await peers.publish(JobReleased(job_id=job.id, worker_id="w-x", attempt=1, step=4))
    await peers.publish(JobReleased(job_id=job.id, worker_id="w-1", attempt=2, step=4))
    await asyncio.sleep(0.3)
    assert await status_of(stub, dev, job.id) == pb.JOB_STATUS_RUNNING
    del peers.workers["w-1"]
    await peers.publish(JobReleased(job_id=job.id, worker_id="w-1", attempt=1, step=4,
                                    checkpoint_key=f"tenants/{TENANT}/jobs/x/checkpoint-4",
                                    reason="worker w-1 shutting down"))
    await peers.wait_for(JobRequeued, job_id=job.id, attempt=2)
    peers.workers["w-2"] = "idle"
    await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-2", attempt=2)
    peers.runs("w-2", job.id)
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-2", attempt=2,
                                   resumed_from_step=4))
    await wait_status(stub, dev, job.id, pb.JOB_STATUS_RUNNING)

    # the old attempt's completion is refused: no success is announced for it
    completion = {"job_id": job.id, "model_name": "tiny-model-lora", "spec": first.data.spec,
                  "dataset_id": "ds-1", "dataset_sha256": SHA, "dataset_artifacts": ARTIFACTS,
                  "adapter_key": CK9, "checkpoint_key": CK9, "steps": 9,
                  "final_loss": 1.0}
    await peers.publish(JobCompleted(worker_id="w-1", attempt=1, **completion))
    await asyncio.sleep(0.5)
    assert await status_of(stub, dev, job.id) == pb.JOB_STATUS_RUNNING
    assert peers.count(JobSucceeded, job_id=job.id) == 0
    await peers.publish(JobCompleted(worker_id="w-2", attempt=2, **completion))
    done = await wait_status(stub, dev, job.id, pb.JOB_STATUS_SUCCEEDED)
    assert [(a.attempt, a.worker_id, a.resumed_from_step) for a in done.attempts] == [
        (1, "w-1", 0), (2, "w-2", 4)]
    assert done.attempts[0].reason == "released: worker w-1 shutting down"
    succeeded = await peers.wait_for(JobSucceeded, job_id=job.id)
    assert succeeded.data.attempt == 2 and succeeded.data.worker_id == "w-2"


async def test_a_job_its_worker_no_longer_runs_is_requeued_unless_its_outcome_is_coming(
        env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]
    job = await create(stub, dev, model_dir)
    await validate(peers, job.id)
    peers.workers["w-1"] = "idle"
    await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-1")
    peers.runs("w-1", job.id)
    await peers.publish(JobStarted(job_id=job.id, worker_id="w-1"))
    await wait_status(stub, dev, job.id, pb.JOB_STATUS_RUNNING)
    # it ended the attempt; its outcome is still in its outbox (the broker was away): wait
    peers.workers["w-1"] = "idle"
    del peers.running["w-1"]
    peers.hardware["w-1"] = {"ended_job_id": job.id, "ended_attempt": 1}
    await asyncio.sleep(1.0)  # over twice the settle time (0.4 x TTL 1 s)
    assert await status_of(stub, dev, job.id) == pb.JOB_STATUS_RUNNING
    # a worker that says idle without having ended it (restarted under the same id) lost it
    peers.hardware["w-1"] = {}
    again = await peers.wait_for(JobRequeued, job_id=job.id, attempt=2)
    assert again.data.reason == "worker w-1 reports running nothing"
    await peers.wait_for(WorkItem, job_id=job.id, worker_id="w-1", attempt=2)


async def test_priority_classes_are_bounded_by_role(env, model_dir):
    stub, keys, peers = env

    async def refused(key: str, **request) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateJob(pb.CreateJobRequest(spec=struct(spec(model_dir)), **request),
                                 metadata=md(key))
        return e.value

    err = await refused(keys["developer"], priority_class="urgent")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "up to high" in err.details()
    err = await refused(keys["developer"], priority_class="asap")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority_class" in err.details()
    err = await refused(keys["developer"], priority=9)  # the old free int is gone
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority_class" in err.details()
    urgent = await create(stub, keys["admin"], model_dir, priority="urgent")
    assert (urgent.priority_class, urgent.priority) == ("urgent", 3)
    plain = await create(stub, keys["developer"], model_dir)
    assert plain.priority_class == "normal"


async def test_pause_and_resume_keep_the_queue_place_and_hand_running_jobs_back(
        env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]
    first = await create(stub, dev, model_dir)
    second = await create(stub, dev, model_dir)
    for j in (first, second):
        await validate(peers, j.id)
        await wait_status(stub, dev, j.id, pb.JOB_STATUS_QUEUED)

    # a queued job pauses at once and is not placed while paused
    paused = await stub.PauseJob(pb.PauseJobRequest(id=first.id), metadata=md(dev))
    assert paused.status == pb.JOB_STATUS_PAUSED
    await peers.wait_for(JobPaused, job_id=first.id)
    peers.workers["w-1"] = "idle"
    await peers.wait_for(WorkItem, job_id=second.id, worker_id="w-1")
    assert peers.count(WorkItem, job_id=first.id) == 0

    # a running job: its worker is asked to hand it back; paused once it has
    peers.runs("w-1", second.id)
    await peers.publish(JobStarted(job_id=second.id, worker_id="w-1"))
    await wait_status(stub, dev, second.id, pb.JOB_STATUS_RUNNING)
    pausing = await stub.PauseJob(pb.PauseJobRequest(id=second.id), metadata=md(dev))
    assert pausing.status == pb.JOB_STATUS_RUNNING
    ask = await peers.wait_for(JobReleaseRequested, job_id=second.id)
    assert (ask.data.worker_id, ask.data.attempt) == ("w-1", 1)
    assert ask.data.reason.startswith("paused by key-")
    await peers.publish(JobReleased(job_id=second.id, worker_id="w-1", attempt=1, step=6,
                                    reason=f"{ask.data.reason} at step 6"))
    now_paused = await wait_status(stub, dev, second.id, pb.JOB_STATUS_PAUSED)
    assert now_paused.attempt == 2 and now_paused.worker_id == ""
    peers.workers["w-1"] = "idle"
    del peers.running["w-1"]

    # resumed: the older one (submitted first) is placed first
    for j in (second, first):
        resumed = await stub.ResumeJob(pb.ResumeJobRequest(id=j.id), metadata=md(dev))
        assert resumed.status == pb.JOB_STATUS_QUEUED
        await peers.wait_for(JobResumed, job_id=j.id)
    await peers.wait_for(WorkItem, job_id=first.id, worker_id="w-1")

    # other tenants cannot; finished jobs cannot pause
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.PauseJob(pb.PauseJobRequest(id=second.id), metadata=md(keys["other-tenant"]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.CancelJob(pb.CancelJobRequest(id=second.id), metadata=md(dev))
    await wait_status(stub, dev, second.id, pb.JOB_STATUS_CANCELLED)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.PauseJob(pb.PauseJobRequest(id=second.id), metadata=md(dev))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_urgent_job_preempts_the_lowest_class_never_the_same_class(env, model_dir):
    stub, keys, peers = env
    dev, admin = keys["developer"], keys["admin"]
    lows = {}  # worker id -> the low job it runs
    for worker_id in ("w-1", "w-2"):
        low = await create(stub, dev, model_dir, priority="low")
        await validate(peers, low.id)
        peers.workers[worker_id] = "idle"
        await peers.wait_for(WorkItem, job_id=low.id, worker_id=worker_id)
        peers.runs(worker_id, low.id)
        await peers.publish(JobStarted(job_id=low.id, worker_id=worker_id))
        await wait_status(stub, dev, low.id, pb.JOB_STATUS_RUNNING)
        lows[worker_id] = low.id

    # another low job waits: it preempts nothing
    waiting_low = await create(stub, dev, model_dir, priority="low")
    await validate(peers, waiting_low.id)
    await wait_status(stub, dev, waiting_low.id, pb.JOB_STATUS_QUEUED)
    await asyncio.sleep(0.8)
    assert peers.count(JobReleaseRequested) == 0

    urgent = await create(stub, admin, model_dir, priority="urgent")
    await validate(peers, urgent.id)
    ask = await peers.wait_for(JobReleaseRequested)
    victim, worker_id = ask.data.job_id, ask.data.worker_id
    assert victim == lows["w-2"] and worker_id == "w-2"  # the newest of the lowest class
    assert ask.data.reason == f"preempted by {urgent.id}"
    await asyncio.sleep(0.8)  # asked once, not every tick
    assert peers.count(JobReleaseRequested) == 1
    await peers.publish(JobReleased(job_id=victim, worker_id=worker_id, attempt=1, step=8,
                                    reason=f"{ask.data.reason} at step 8"))
    requeued = await wait_status(stub, dev, victim, pb.JOB_STATUS_QUEUED)
    # its worker heartbeats busy a while longer: the urgent job waits for it, preempting no other
    await asyncio.sleep(0.8)
    assert peers.count(JobReleaseRequested) == 1
    peers.workers[worker_id] = "idle"
    del peers.running[worker_id]
    await peers.wait_for(WorkItem, job_id=urgent.id, worker_id=worker_id)
    assert requeued.attempt == 2
    assert requeued.attempts[0].reason == f"released: preempted by {urgent.id} at step 8"
    assert peers.count(JobReleaseRequested) == 1


async def test_quotas_refuse_or_hold_jobs_and_tenants_share_the_workers(env, model_dir):
    stub, keys, peers = env
    dev, admin, other = keys["developer"], keys["admin"], keys["other-tenant"]

    async def set_quota(key: str, **quota) -> pb.Quota:
        return await stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(**quota)), metadata=md(key))

    # who may set quotas: admins, for their own tenant; platform admins, for any
    for key, tenant in [(dev, TENANT), (keys["other-admin"], TENANT)]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await set_quota(key, tenant=tenant, max_running=1)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetQuota(pb.GetQuotaRequest(tenant="globex"), metadata=md(dev))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    mine = await set_quota(admin, max_running=1, max_queued=4)
    assert (mine.tenant, mine.max_running, mine.max_queued, mine.weight) == (TENANT, 1, 4, 1.0)
    await set_quota(keys["platform-admin"], tenant="globex", max_running=1)
    got = await stub.GetQuota(pb.GetQuotaRequest(), metadata=md(dev))
    assert (got.max_running, got.updated_by) == (1, mine.updated_by)
    changed = await peers.wait_for(QuotaChanged, tenant="globex")
    assert changed.data.max_running == 1

    # max_queued 4: the fifth waiting job is refused, naming the quota
    ours = [await create(stub, dev, model_dir) for _ in range(4)]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(stub, dev, model_dir)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota queued 4/4" in e.value.details()
    theirs = [await create(stub, other, model_dir) for _ in range(4)]
    for j in ours:
        await validate(peers, j.id)
    for j in theirs:
        await validate(peers, j.id, tenant="globex")
    for j in ours + theirs:
        await wait_status(stub, dev if j in ours else other, j.id, pb.JOB_STATUS_QUEUED)

    # running quota 1 each, 2 workers: one job of each tenant runs, the rest wait saying why
    peers.workers["w-1"] = "idle"
    peers.workers["w-2"] = "idle"
    first = [await peers.wait_for(WorkItem, job_id=ours[0].id),
             await peers.wait_for(WorkItem, job_id=theirs[0].id)]
    await asyncio.sleep(0.8)
    assert sum(peers.count(WorkItem, job_id=j.id) for j in ours + theirs) == 2
    held = await stub.GetJob(pb.GetJobRequest(id=ours[1].id), metadata=md(dev))
    assert held.waiting_reason == "quota running 1/1"
    # as each finishes, the next of the same tenant takes the freed worker: they alternate
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for j, item, key, tenant in ((a, first[0], dev, TENANT),
                                     (b, first[1], other, "globex")):
            w = item.data.worker_id
            await peers.publish(JobStarted(job_id=j.id, worker_id=w), tenant=tenant)
            await peers.publish(JobFailed(job_id=j.id, worker_id=w, reason="done"),
                                tenant=tenant)
            await wait_status(stub, key, j.id, pb.JOB_STATUS_FAILED)
        if i + 1 < len(ours):
            first = [await peers.wait_for(WorkItem, job_id=ours[i + 1].id),
                     await peers.wait_for(WorkItem, job_id=theirs[i + 1].id)]


async def test_higher_priority_runs_first(env, model_dir):
    stub, keys, peers = env
    dev = keys["developer"]
    low = await create(stub, dev, model_dir, priority="low")
    high = await create(stub, dev, model_dir, priority="high")
    assert (low.priority, high.priority) == (0, 2)
    for job in (low, high):
        await validate(peers, job.id)
        await wait_status(stub, dev, job.id, pb.JOB_STATUS_QUEUED)
    peers.workers["w-only"] = "idle"
    await peers.wait_for(WorkItem, job_id=high.id)
    await asyncio.sleep(0.8)  # a few placement ticks: the one worker holds the high job
    assert peers.count(WorkItem, job_id=low.id) == 0


async def test_a_job_behind_a_queue_head_no_worker_can_run_is_still_placed(
        env, model_dir, tmp_path):
    """Placement reads the heads of the queues (16 jobs each here); a worker left free behind a
    full head of jobs it cannot run makes it read them all."""
    stub, keys, peers = env
    dev = keys["developer"]
    big = tmp_path / "big-llama"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000}))
    heads = [await create(stub, dev, big) for _ in range(17)]
    small = await create(stub, dev, model_dir)
    for j in (*heads, small):
        await validate(peers, j.id)
    await wait_status(stub, dev, small.id, pb.JOB_STATUS_QUEUED)
    peers.hardware["w-small"] = {"device": "cpu", "memory_bytes": 1 << 30}
    peers.workers["w-small"] = "idle"
    item = await peers.wait_for(WorkItem, job_id=small.id)
    assert item.data.worker_id == "w-small"
    assert sum(peers.count(WorkItem, job_id=j.id) for j in heads) == 0
    waiting = await stub.GetJob(pb.GetJobRequest(id=heads[0].id), metadata=md(dev))
    assert waiting.waiting_reason.startswith("no worker can run it (w-small: needs ~")


async def test_memory_estimate_and_hardware_checks(env, tmp_path):
    stub, keys, peers = env
    dev = keys["developer"]
    llama = tmp_path / "small-llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1000, "tie_word_embeddings": True,
    }))

    # the pre-flight estimate comes back at submit, and is stored with the job
    job = await create(stub, dev, llama)
    estimate = dict(job.memory_estimate)
    assert set(estimate) == {"weights", "gradients", "optimizer", "activations", "total"}
    assert all(v > 0 for v in estimate.values())
    stored = await stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md(dev))
    assert dict(stored.memory_estimate) == estimate

    # only a CPU worker is live: an fp16 spec is refused, saying why and who is there
    peers.hardware["w-cpu"] = {"device": "cpu", "memory_bytes": 1 << 20}
    peers.workers["w-cpu"] = "idle"
    await peers.wait_for(WorkerHeartbeat, worker_id="w-cpu")
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(stub, dev, llama, precision="fp16")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fp16" in refused.value.details() and "GPU" in refused.value.details()
    assert "w-cpu (cpu" in refused.value.details()

    # the job needs more than the CPU worker's 1 MiB: it waits for a bigger worker
    await validate(peers, job.id)
    await wait_status(stub, dev, job.id, pb.JOB_STATUS_QUEUED)
    await asyncio.sleep(0.8)  # a few placement ticks
    assert peers.count(WorkItem, job_id=job.id) == 0
    peers.hardware["w-big"] = {"device": "cpu", "memory_bytes": 64 << 30}
    peers.workers["w-big"] = "idle"
    item = await peers.wait_for(WorkItem, job_id=job.id)
    assert item.data.worker_id == "w-big"


# -- the store on SQLite and PostgreSQL (the db_url fixture) -------------------------------------

@pytest.fixture
def store(db_url):
    s = SchedulerStore(db_url)
    s.migrate()
    yield s
    s.dispose()


def _job(job_id: str, key: str | None = None, **kw) -> Job:
    now = now_iso()
    return Job(id=job_id, tenant=TENANT, status=Status.QUEUED, priority=1, created_by="key-1",
               spec={"base_model": "/m", "hyperparameters": {"max_steps": 3}}, model_name="m-lora",
               dataset_id="ds-1", created_at=now, updated_at=now, idempotency_key=key, **kw)


def test_store_round_trip_versions_and_queries(store):
    with store.unit() as u:
        u.add_job(_job("job-a", key="k1", dataset_artifacts=ARTIFACTS))
        u.add_job(_job("job-b", worker_id="w-1"))
        u.add_job(_job("job-c", cancel_requested=True))
    with pytest.raises(IntegrityError), store.unit() as u:
        u.add_job(_job("job-d", key="k1"))  # the key is taken in this tenant

    with store.unit() as u:
        a = u.job("job-a", TENANT)
        assert u.job("job-a", "globex") is None
        assert u.job_by_key(TENANT, "k1") == a
        assert a.status == Status.QUEUED and a.dataset_artifacts == ARTIFACTS
        assert a.spec["hyperparameters"]["max_steps"] == 3 and a.version == 1
        assert [j.id for j in u.waiting_jobs()] == ["job-a"]
        assert [j.id for j in u.assigned_jobs()] == ["job-b"]
        assert {j.id for j in u.jobs(TENANT, Status.QUEUED)} == {"job-a", "job-b", "job-c"}
        assert u.jobs(TENANT, Status.RUNNING) == []

    with store.unit() as u:
        saved = u.save(dataclasses.replace(a, status=Status.RUNNING, metrics={"loss": 1.5}))
    assert saved.version == 2
    with pytest.raises(Conflict), store.unit() as u:
        u.save(dataclasses.replace(a, status=Status.FAILED))  # written over a stale read
    with store.unit() as u:
        assert u.job("job-a").status == Status.RUNNING
        assert u.job("job-a").metrics == {"loss": 1.5}

        assert u.add_sample("job-a", 2, {"loss": 2.0})
        assert u.add_sample("job-a", 1, {"loss": 3.0})
        assert not u.add_sample("job-a", 2, {"loss": 9.0})
        assert u.samples("job-a") == [(1, {"loss": 3.0}), (2, {"loss": 2.0})]

        u.enqueue("s.1", "{1}", "tp1")
        u.enqueue("s.2", "{2}", "")
        pending = u.pending_events()
        assert [(p.subject, p.envelope, p.traceparent) for p in pending] == [
            ("s.1", "{1}", "tp1"), ("s.2", "{2}", "")]
        u.remove_events([pending[0].id])
        assert [p.subject for p in u.pending_events()] == ["s.2"]


def test_store_keeps_the_memory_estimate(store):
    estimate = {"weights": 1.0, "gradients": 2.0, "optimizer": 3.0, "activations": 4.0,
                "total": 10.0}
    with store.unit() as u:
        u.add_job(_job("job-m", memory_estimate=estimate))
        u.add_job(_job("job-none"))
    with store.unit() as u:
        assert u.job("job-m").memory_estimate == estimate
        assert u.job("job-none").memory_estimate == {}

"""JobService over gRPC: proto <-> domain translation; every call is scoped to the caller's
tenant (another tenant's job is NOT_FOUND)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from sqlalchemy.exc import IntegrityError

from llmstudio import telemetry
from llmstudio.auth import current_principal
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound
from llmstudio.events import JobCancelled, JobCancelRequested, JobSubmitted
from llmstudio.jobspec import JobSpec
from llmstudio.ml.memory import estimate_memory, model_config_of
from llmstudio.v1 import jobs_pb2 as pb
from llmstudio.v1 import jobs_pb2_grpc

from . import core
from .core import Job, Status, WorkerTable
from .outbox import Outbox
from .store import Conflict, SchedulerStore
from .watch import Update, Watchers

CANCEL_ATTEMPTS = 3  # a cancel racing placement or a worker re-reads the job and decides again


class JobApi(jobs_pb2_grpc.JobServiceServicer):
    PERMISSIONS = {
        "CreateJob": "write",
        "GetJob": "read",
        "ListJobs": "read",
        "CancelJob": "write",
        "WatchJob": "read",
    }

    def __init__(
        self, store: SchedulerStore, outbox: Outbox, watchers: Watchers, actor: str,
        workers: WorkerTable | None = None,
    ):
        self.store = store
        self.outbox = outbox
        self.watchers = watchers
        self.actor = actor
        self.workers = workers  # live workers: a spec none of them can run is refused

    async def CreateJob(self, request: pb.CreateJobRequest, context) -> pb.Job:
        principal = current_principal()
        key = request.idempotency_key or None
        if key:
            with self.store.unit() as u:
                existing = u.job_by_key(principal.tenant, key)
            if existing:
                return job_to_pb(existing)
        spec = _with_local_model(core.parse_spec(json_format.MessageToDict(request.spec)))
        refusal = core.refuse_on(spec, self.workers.live() if self.workers else [])
        if refusal:
            raise FailedPrecondition(refusal)
        now = core.now_iso()
        job = Job(
            id="job-" + uuid.uuid4().hex[:12], tenant=principal.tenant,
            status=Status.VALIDATING_FILES, spec=spec.model_dump(mode="json"),
            model_name=spec.model_name(), dataset_id=spec.dataset, priority=request.priority,
            created_by=principal.key_id, created_at=now, updated_at=now,
            trace_id=telemetry.current_trace_id(), traceparent=telemetry.traceparent(),
            idempotency_key=key, memory_estimate=_memory_estimate(spec),
        )
        try:
            with self.store.unit() as u:
                u.add_job(job)
                self.outbox.add(u, JobSubmitted(
                    job_id=job.id, dataset_id=job.dataset_id, model_name=job.model_name,
                    spec=job.spec, priority=job.priority,
                ), tenant=job.tenant, actor=principal.key_id)
        except IntegrityError:
            with self.store.unit() as u:  # the same key, submitted concurrently, won
                existing = u.job_by_key(principal.tenant, key) if key else None
            if existing is None:
                raise
            return job_to_pb(existing)
        await self.outbox.flush()
        return job_to_pb(job)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return job_to_pb(self._job(request.id))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        status = status_from_pb(request.status) if request.status else None
        with self.store.unit() as u:
            jobs = u.jobs(current_principal().tenant, status)
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs])

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        """Not yet on a worker: cancelled now. On a worker: the worker is asked to stop, and its
        JobCancelled ends the job. Finished: FAILED_PRECONDITION."""
        principal = current_principal()
        for attempt in range(CANCEL_ATTEMPTS):
            job = self._job(request.id)
            if job.status.terminal:
                raise FailedPrecondition(f"job {job.id} is {job.status.value}")
            try:
                with self.store.unit() as u:
                    if job.assigned or job.status == Status.RUNNING:
                        if not job.cancel_requested:
                            job = u.save(dataclasses.replace(job, cancel_requested=True))
                        self.outbox.add(u, JobCancelRequested(job_id=job.id, worker_id=job.worker_id),
                                        tenant=job.tenant, actor=principal.key_id)
                    else:
                        job = u.save(dataclasses.replace(job, status=Status.CANCELLED))
                        self.outbox.add(u, JobCancelled(
                            job_id=job.id, reason=f"cancelled by {principal.key_id}",
                        ), tenant=job.tenant, actor=principal.key_id)
            except Conflict:
                if attempt == CANCEL_ATTEMPTS - 1:
                    raise
                continue
            break
        if job.status == Status.CANCELLED:
            self.watchers.status(job, f"cancelled by {principal.key_id}")
        await self.outbox.flush()
        return job_to_pb(job)

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        """The job's status, its stored metric samples, then live updates until it ends.

        The queue is opened before the job is read, so nothing between the read and the live
        part is lost; what the read already covered is skipped (same status, older steps)."""
        with self.watchers.watch(request.id) as queue:
            job = self._job(request.id)
            yield pb.JobUpdate(kind="status", job=job_to_pb(job), message=job.error)
            with self.store.unit() as u:
                samples = u.samples(job.id)
            last_step = -1
            for step, metrics in samples:
                yield pb.JobUpdate(kind="metrics", job=job_to_pb(job), step=step, metrics=metrics)
                last_step = step
            status = job.status
            while not status.terminal:
                update = await queue.get()
                if update.kind == "metrics":
                    if update.step <= last_step:
                        continue
                    last_step = update.step
                elif update.kind == "status":
                    if update.job.status == status:
                        continue
                    status = update.job.status
                    if status.terminal:  # samples stored after the last one sent, then the end
                        with self.store.unit() as u:
                            late = [s for s in u.samples(job.id) if s[0] > last_step]
                        for step, metrics in late:
                            yield pb.JobUpdate(kind="metrics", job=job_to_pb(update.job),
                                               step=step, metrics=metrics)
                yield update_to_pb(update)

    def _job(self, job_id: str) -> Job:
        with self.store.unit() as u:
            job = u.job(job_id, current_principal().tenant) if job_id else None
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job


def _with_local_model(spec: JobSpec) -> JobSpec:
    """A base_model written as a path (or naming one that exists) must be a model directory;
    it is stored absolute, so workers on this filesystem find it whatever their cwd."""
    if not (core.names_a_path(spec.base_model) or os.path.exists(spec.base_model)):
        return spec  # a hub id: workers with network load it
    path = Path(spec.base_model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise InvalidArgument(
            "spec.base_model", f"no model directory at {spec.base_model} (config.json missing)")
    return spec.model_copy(update={"base_model": str(path)})


def _memory_estimate(spec: JobSpec) -> dict[str, float]:
    """The pre-flight memory estimate of a local base model ({} for a hub id: no config here)."""
    if not os.path.isabs(spec.base_model):
        return {}
    config = model_config_of(spec.base_model)
    try:
        return estimate_memory(config, spec) if config else {}
    except (ArithmeticError, TypeError, ValueError):  # an odd config: no estimate, no refusal
        return {}


def status_to_pb(status: Status) -> int:
    return pb.JobStatus.Value(f"JOB_STATUS_{status.name}")


def status_from_pb(value: int) -> Status:
    try:
        return Status[pb.JobStatus.Name(value).removeprefix("JOB_STATUS_")]
    except (ValueError, KeyError):
        raise InvalidArgument("status", f"unknown job status {value}") from None


def job_to_pb(job: Job) -> pb.Job:
    spec = Struct()
    spec.update(job.spec)
    return pb.Job(
        id=job.id, tenant=job.tenant, status=status_to_pb(job.status), spec=spec,
        model_name=job.model_name, dataset_id=job.dataset_id, dataset_sha256=job.dataset_sha256,
        worker_id=job.worker_id, error=job.error, priority=job.priority, metrics=job.metrics,
        artifacts=job.artifacts, trace_id=job.trace_id, created_at=job.created_at,
        updated_at=job.updated_at, created_by=job.created_by,
        memory_estimate=job.memory_estimate,
    )


def update_to_pb(update: Update) -> pb.JobUpdate:
    return pb.JobUpdate(
        kind=update.kind, job=job_to_pb(update.job), step=update.step, metrics=update.metrics,
        message=update.message,
    )

"""JobService over gRPC: proto <-> use case translation (`usecases.Jobs`); every call is scoped to
the caller's tenant (another tenant's job is NOT_FOUND)."""

from __future__ import annotations

import dataclasses
from contextlib import aclosing

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from llmstudio.auth import current_principal
from llmstudio.errors import InvalidArgument
from llmstudio.v1 import jobs_pb2 as pb
from llmstudio.v1 import jobs_pb2_grpc

from .core import Job, PriorityClass, Quota, Status
from .usecases import Jobs
from .watch import Update


class JobApi(jobs_pb2_grpc.JobServiceServicer):
    PERMISSIONS = {
        "CreateJob": "write",
        "GetJob": "read",
        "ListJobs": "read",
        "CancelJob": "write",
        "PauseJob": "write",
        "ResumeJob": "write",
        "SetQuota": "admin",
        "GetQuota": "read",
        "WatchJob": "read",
    }

    def __init__(self, jobs: Jobs, aging_s: float = 0.0):
        self.jobs = jobs
        self.aging_s = aging_s  # what placement ages waiting jobs by: their order in why_waiting

    async def CreateJob(self, request: pb.CreateJobRequest, context) -> pb.Job:
        if request.priority:
            raise InvalidArgument("priority", "replaced by priority_class (low, normal, high, "
                                  "urgent); leave priority unset")
        job = await self.jobs.create(
            json_format.MessageToDict(request.spec), request.priority_class,
            request.idempotency_key, current_principal(),
        )
        return job_to_pb(job)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        job = await self.jobs.get(request.id, current_principal().tenant)
        out = job_to_pb(job)
        out.waiting_reason = await self.jobs.why_waiting(job, self.aging_s)
        return out

    async def SetQuota(self, request: pb.SetQuotaRequest, context) -> pb.Quota:
        q, caller = request.quota, current_principal()
        quota = Quota(tenant=q.tenant or caller.tenant, max_running=q.max_running,
                      max_queued=q.max_queued, max_gpus=q.max_gpus,
                      max_cpu_slots=q.max_cpu_slots, weight=q.weight or 1.0)
        return quota_to_pb(await self.jobs.set_quota(quota, caller))

    async def GetQuota(self, request: pb.GetQuotaRequest, context) -> pb.Quota:
        caller = current_principal()
        return quota_to_pb(await self.jobs.get_quota(request.tenant or caller.tenant, caller))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        status = status_from_pb(request.status) if request.status else None
        jobs = await self.jobs.list(current_principal().tenant, status, request.page_size,
                                    request.page_token)
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs],
                                   next_page_token=jobs.next_page_token)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return job_to_pb(await self.jobs.cancel(request.id, current_principal()))

    async def PauseJob(self, request: pb.PauseJobRequest, context) -> pb.Job:
        return job_to_pb(await self.jobs.pause(request.id, current_principal()))

    async def ResumeJob(self, request: pb.ResumeJobRequest, context) -> pb.Job:
        return job_to_pb(await self.jobs.resume(request.id, current_principal()))

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        updates = self.jobs.watch(request.id, current_principal().tenant)
        async with aclosing(updates):  # a client gone mid-stream closes its watch at once
            async for update in updates:
                yield update_to_pb(update)


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
        memory_estimate=job.memory_estimate, attempt=job.attempt,
        priority_class=PriorityClass(job.priority).label,
        attempts=[pb.JobAttempt(
            attempt=a.attempt, worker_id=a.worker_id, assigned_at=a.assigned_at,
            started_at=a.started_at, ended_at=a.ended_at, reason=a.reason,
            resumed_from_step=a.resumed_from_step) for a in job.attempts],
    )


def quota_to_pb(quota: Quota) -> pb.Quota:
    return pb.Quota(**dataclasses.asdict(quota))


def update_to_pb(update: Update) -> pb.JobUpdate:
    return pb.JobUpdate(
        kind=update.kind, job=job_to_pb(update.job), step=update.step, metrics=update.metrics,
        message=update.message,
    )

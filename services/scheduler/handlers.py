"""Bus handlers: what the dataset service and the workers report, translated into the use cases
of `usecases.Reports` (which keep them idempotent and tenant-scoped); heartbeats feed the
in-memory worker table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from llmstudio.bus import Bus, refuse_foreign_keys
from llmstudio.events import (
    DatasetRejected,
    DatasetValidated,
    Envelope,
    EventData,
    JobCancelled,
    JobCheckpointed,
    JobCompleted,
    JobFailed,
    JobMetrics,
    JobReleased,
    JobStarted,
    WorkerHeartbeat,
)

from .core import Happening, Report, WorkerTable, metrics_sample
from .usecases import Reports

MAX_REJECTION_ERRORS = 5


def _started(e: JobStarted) -> Report:
    return Report(Happening.STARTED, e.worker_id, attempt=e.attempt,
                  resumed_from_step=e.resumed_from_step)


def _completed(e: JobCompleted) -> Report:
    return Report(
        Happening.COMPLETED, e.worker_id,
        artifacts={"checkpoint": e.checkpoint_key, "adapter": e.adapter_key},
        metrics={"final_loss": e.final_loss, "steps": float(e.steps)}, attempt=e.attempt,
    )


def _failed(e: JobFailed) -> Report:
    return Report(Happening.FAILED, e.worker_id, reason=e.reason, attempt=e.attempt)


def _cancelled(e: JobCancelled) -> Report:
    return Report(Happening.CANCELLED, reason=e.reason, attempt=e.attempt)


# A worker's report -> what it says about the job. The scheduler's own job events on the stream
# are not subscribed.
REPORTS: dict[type[EventData], Callable[[Any], Report]] = {
    JobStarted: _started,
    JobCompleted: _completed,
    JobFailed: _failed,
    JobCancelled: _cancelled,
}
# One consumer for every worker report, so a job's reports are handled in the order sent.
JOB_REPORTS = (JobCheckpointed, JobReleased, *REPORTS)


class Handlers:
    def __init__(self, reports: Reports, workers: WorkerTable,
                 worker_freed: Callable[[], None] = lambda: None):
        self.reports = reports
        self.workers = workers
        self.worker_freed = worker_freed  # a worker just became idle: placement may act
        self._on_job: dict[type[EventData], Callable[[Envelope, Any], Awaitable[None]]] = {
            JobCheckpointed: self.on_checkpointed, JobReleased: self.on_released,
            **dict.fromkeys(REPORTS, self.on_report),
        }

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(DatasetValidated, durable="dataset-validated", handler=self.on_validated)
        bus.subscribe(DatasetRejected, durable="dataset-rejected", handler=self.on_rejected,
                      entity=">")
        bus.subscribe(JOB_REPORTS, durable="jobs", handler=self.on_job_event)
        bus.subscribe(JobMetrics, durable="metrics", handler=self.on_metrics)
        bus.subscribe_core(WorkerHeartbeat, self.on_heartbeat)

    # -- dataset service ----------------------------------------------------------------------
    async def on_validated(self, env: Envelope, data: DatasetValidated) -> None:
        refuse_foreign_keys(env.tenant, *data.artifacts.values())
        await self.reports.dataset_validated(
            env.tenant, data.job_id, dataset_id=data.dataset_id, sha256=data.sha256,
            artifacts=dict(data.artifacts),
        )

    async def on_rejected(self, env: Envelope, data: DatasetRejected) -> None:
        if not data.job_id:
            return  # a rejected upload: no job involved
        reason = data.reason
        if data.errors:
            reason += ": " + "; ".join(data.errors[:MAX_REJECTION_ERRORS])
        await self.reports.dataset_rejected(env.tenant, data.job_id, reason)

    # -- workers ------------------------------------------------------------------------------
    async def on_heartbeat(self, env: Envelope, data: WorkerHeartbeat) -> None:
        if self.workers.heartbeat(data.worker_id, data.state, data.job_id, data.device,
                                  data.memory_bytes, data.bf16,
                                  (data.ended_job_id, data.ended_attempt), data.device_count,
                                  data.slots):
            self.worker_freed()

    async def on_job_event(self, env: Envelope, data: EventData) -> None:
        # A worker names only keys of the job's tenant (the use cases check the job is theirs).
        refuse_foreign_keys(env.tenant, getattr(data, "checkpoint_key", ""),
                            getattr(data, "adapter_key", ""))
        await self._on_job[type(data)](env, data)

    async def on_report(
        self, env: Envelope, data: JobStarted | JobCompleted | JobFailed | JobCancelled,
    ) -> None:
        report = REPORTS[type(data)](data)
        completion = data.model_dump() if isinstance(data, JobCompleted) else None
        await self.reports.worker_reported(env.tenant, data.job_id, report, completion)

    async def on_released(self, env: Envelope, data: JobReleased) -> None:
        await self.reports.worker_released(env.tenant, data.job_id, worker_id=data.worker_id,
                                           attempt=data.attempt, reason=data.reason)

    async def on_checkpointed(self, env: Envelope, data: JobCheckpointed) -> None:
        await self.reports.checkpointed(env.tenant, data.job_id, data.step, data.checkpoint_key,
                                        data.attempt)

    async def on_metrics(self, env: Envelope, data: JobMetrics) -> None:
        sample = metrics_sample(
            step=data.step, max_steps=data.max_steps, loss=data.loss,
            learning_rate=data.learning_rate, tokens_per_s=data.tokens_per_s,
            samples_per_s=data.samples_per_s, epoch=data.epoch, grad_norm=data.grad_norm,
            memory_bytes=data.memory_bytes, eta_s=data.eta_s, eval_loss=data.eval_loss,
        )
        await self.reports.metrics(env.tenant, data.job_id, data.step, sample, data.attempt)

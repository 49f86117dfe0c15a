"""Bus handlers: what the dataset service and the workers report, turned into job transitions.

Delivery is at least once, so every handler is idempotent: the state machine (`core.transition`)
ignores a happening that no longer applies, and a metrics sample is stored once per step. An
event is applied only to a job of the event's own tenant, and a worker's report only while that
worker holds the job (a worker taken off a job can't move it any more).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from llmstudio.bus import Bus
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
    JobQueued,
    JobStarted,
    WorkerHeartbeat,
)

from .core import Happening, Job, WorkerTable, latest_metrics, metrics_sample, transition
from .outbox import Outbox
from .store import SchedulerStore, Unit
from .watch import Watchers

log = logging.getLogger(__name__)

# Worker reports that move a job; the scheduler's own job events on the stream are skipped.
_HAPPENINGS: dict[type[EventData], Happening] = {
    JobStarted: Happening.STARTED,
    JobCompleted: Happening.COMPLETED,
    JobFailed: Happening.FAILED,
    JobCancelled: Happening.CANCELLED,
}
JOB_REPORTS = (JobCheckpointed, *_HAPPENINGS)
MAX_REJECTION_ERRORS = 5


class Handlers:
    def __init__(
        self, store: SchedulerStore, outbox: Outbox, watchers: Watchers, workers: WorkerTable,
        actor: str,
    ):
        self.store = store
        self.outbox = outbox
        self.watchers = watchers
        self.workers = workers
        self.actor = actor

    def subscribe(self, bus: Bus) -> None:
        bus.subscribe(DatasetValidated, durable="dataset-validated", handler=self.on_validated)
        bus.subscribe(DatasetRejected, durable="dataset-rejected", handler=self.on_rejected,
                      entity=">")
        bus.subscribe(JOB_REPORTS, durable="jobs", handler=self.on_job_event)
        bus.subscribe(JobMetrics, durable="metrics", handler=self.on_metrics)
        bus.subscribe_core(WorkerHeartbeat, self.on_heartbeat)

    # -- dataset service ----------------------------------------------------------------------
    async def on_validated(self, env: Envelope, data: EventData) -> None:
        if not isinstance(data, DatasetValidated):
            return

        def queue(u: Unit, job: Job) -> Job | None:
            new = transition(job.status, Happening.VALIDATED)
            if new is None:
                return None
            job = u.save(dataclasses.replace(
                job, status=new,
                dataset_id=data.dataset_id or job.dataset_id, dataset_sha256=data.sha256,
                dataset_artifacts=dict(data.artifacts),
            ))
            self.outbox.add(u, JobQueued(job_id=job.id, dataset_sha256=job.dataset_sha256),
                            tenant=job.tenant, actor=self.actor)
            return job

        await self._change_status(env, data.job_id, queue)

    async def on_rejected(self, env: Envelope, data: EventData) -> None:
        if not isinstance(data, DatasetRejected) or not data.job_id:
            return  # a rejected upload: no job involved
        reason = data.reason
        if data.errors:
            reason += ": " + "; ".join(data.errors[:MAX_REJECTION_ERRORS])

        def fail(u: Unit, job: Job) -> Job | None:
            new = transition(job.status, Happening.REJECTED)
            if new is None:
                return None
            job = u.save(dataclasses.replace(job, status=new, error=reason))
            self.outbox.add(u, JobFailed(job_id=job.id, reason=reason),
                            tenant=job.tenant, actor=self.actor)
            return job

        await self._change_status(env, data.job_id, fail)

    # -- workers ------------------------------------------------------------------------------
    async def on_heartbeat(self, env: Envelope, data: EventData) -> None:
        if isinstance(data, WorkerHeartbeat):
            self.workers.heartbeat(data.worker_id, data.state, data.job_id, data.device,
                                   data.memory_bytes, data.bf16)

    async def on_job_event(self, env: Envelope, data: EventData) -> None:
        if isinstance(data, JobCheckpointed):
            await self._checkpointed(env, data)
            return
        happening = _HAPPENINGS.get(type(data))
        if happening is None:
            return
        worker_id = getattr(data, "worker_id", "")

        def apply(u: Unit, job: Job) -> Job | None:
            new = transition(job.status, happening)
            if new is None:
                return None
            if worker_id and job.worker_id and worker_id != job.worker_id:
                log.warning("ignoring %s of %s from %s: the job is on %s",
                            env.type, job.id, worker_id, job.worker_id)
                return None
            changes: dict = {"status": new, "worker_id": worker_id or job.worker_id}
            if isinstance(data, JobCompleted):
                changes["artifacts"] = {
                    **job.artifacts, "checkpoint": data.checkpoint_key, "adapter": data.adapter_key,
                }
                changes["metrics"] = {
                    **job.metrics, "final_loss": data.final_loss, "steps": float(data.steps),
                }
            elif isinstance(data, JobFailed):
                changes["error"] = data.reason
            return u.save(dataclasses.replace(job, **changes))

        message = getattr(data, "reason", "")
        await self._change_status(env, data.job_id, apply, message)

    async def _checkpointed(self, env: Envelope, data: JobCheckpointed) -> None:
        with self.store.unit() as u:
            job = self._job(u, env, data.job_id)
            if job is None or job.status.terminal:
                return
            if job.artifacts.get("checkpoint") == data.checkpoint_key:
                return  # redelivered
            job = u.save(dataclasses.replace(
                job, artifacts={**job.artifacts, "checkpoint": data.checkpoint_key}))
        self.watchers.checkpoint(job, data.step, data.checkpoint_key)

    async def on_metrics(self, env: Envelope, data: EventData) -> None:
        if not isinstance(data, JobMetrics):
            return
        sample = metrics_sample(
            step=data.step, max_steps=data.max_steps, loss=data.loss,
            learning_rate=data.learning_rate, tokens_per_s=data.tokens_per_s,
            samples_per_s=data.samples_per_s, epoch=data.epoch, grad_norm=data.grad_norm,
            memory_bytes=data.memory_bytes, eta_s=data.eta_s, eval_loss=data.eval_loss,
        )
        with self.store.unit() as u:
            job = self._job(u, env, data.job_id)
            if job is None or not u.add_sample(job.id, data.step, sample):
                return
            # Samples travel on their own stream, so the last ones may land after the job ended:
            # the job keeps the newest sample by step.
            if data.step > job.metrics.get("step", -1):
                job = u.save(dataclasses.replace(job, metrics=latest_metrics(job.metrics, sample)))
        self.watchers.metrics(job, data.step, sample)

    # -- helpers ------------------------------------------------------------------------------
    async def _change_status(
        self, env: Envelope, job_id: str, change: Callable[[Unit, Job], Job | None],
        message: str = "",
    ) -> None:
        """Run `change` on the job in one transaction; tell watchers and publish what it queued."""
        with self.store.unit() as u:
            job = self._job(u, env, job_id)
            changed = change(u, job) if job else None
        if changed is None:
            return
        self.watchers.status(changed, message)
        await self.outbox.flush()

    def _job(self, u: Unit, env: Envelope, job_id: str) -> Job | None:
        job = u.job(job_id)
        if job is None:
            log.info("ignoring %s for unknown job %s", env.type, job_id)
        elif job.tenant != env.tenant:
            log.warning("ignoring %s for job %s: event tenant %r is not the job's",
                        env.type, job_id, env.tenant)
            return None
        return job

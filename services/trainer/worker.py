"""The trainer-worker's use cases: accept a work item, run it, cancel it, report liveness.

One job at a time. The job runs as an asyncio task (so it keeps the trace of the work item's
handler span) and the training itself in a thread; the thread calls back into the loop to
report metrics and checkpoints, attaching the job's trace context to each of those calls.

Each job event (started, checkpointed, and the outcome) is recorded with the run's new status in
one transaction and published through the worker's outbox; metrics samples, operational and
frequent, go straight to the METRICS stream. Every report carries the work item's attempt.

Failover: a job goes on from its newest stored checkpoint, whichever worker stored it. A worker
holds its job only while the scheduler has not requeued it (the scheduler does when this
worker's heartbeats stop for its TTL): a JobRequeued of a later attempt fences the job here. The
worker learns it from its subscription, and before every checkpoint upload and outcome it reads
the newest JobRequeued of the job from the stream, so a worker that was frozen past the TTL
(SIGSTOP, a partition) stops at its next step boundary and uploads and reports nothing.
Shutdown (SIGTERM) drains: the job stops at a step boundary, checkpoints, and is handed back
(JobReleased), to be resumed elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import ValidationError

from llmstudio import telemetry
from llmstudio.artifactkeys import check_tenant_key
from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import (
    Envelope,
    EventData,
    JobCancelled,
    JobCancelRequested,
    JobCheckpointed,
    JobCompleted,
    JobFailed,
    JobReleased,
    JobReleaseRequested,
    JobRequeued,
    JobStarted,
    WorkerHeartbeat,
    WorkItem,
)
from llmstudio.jobspec import JobSpec, format_validation_error
from llmstudio.jsonl import parse_jsonl
from llmstudio.ml import checkpoint
from llmstudio.outbox import Outbox
from llmstudio.storage import ArtifactStore

from .core import (
    RUN_STATUS,
    RecentIds,
    default_worker_id,
    failure_reason,
    metrics_event,
    train_split_key,
)
from .distributed import train_distributed
from .host import check_local_model_dir, cpu_hardware
from .recipes import TrainRequest, TrainResult
from .store import TrainerStore, Unit

log = logging.getLogger(__name__)
VALIDATION_SPLIT = "validation"
tracer = trace.get_tracer("trainer")

CANCELLED = "cancelled"
SHUTDOWN = "shutdown"
# On shutdown the running job gets this long to stop at a step boundary and upload its last
# checkpoint before its task is cancelled.
STOP_GRACE_S = 60.0


class WorkerBusy(RuntimeError):
    """Raised by the work handler so the bus redelivers the item later."""


@dataclass
class Job:
    item: WorkItem
    tenant: str
    actor: str
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    checkpoint_key: str = ""  # the last checkpoint uploaded
    fenced: str = ""  # why this worker no longer holds the job (requeued elsewhere)
    task: asyncio.Task | None = None

    def request_stop(self, reason: str) -> None:
        if not self.stop_reason:  # the first reason wins (a cancel is not turned into shutdown)
            self.stop_reason = reason
        self.stop.set()

    def fence(self, requeued: JobRequeued) -> None:
        """Stop for good if `requeued` took this attempt away."""
        if requeued.attempt <= self.item.attempt:
            return
        if not self.fenced:
            self.fenced = (f"lease lost: job requeued as attempt {requeued.attempt} "
                           f"({requeued.reason})")
            log.warning("job %s attempt %d: %s", self.item.job_id, self.item.attempt,
                        self.fenced)
        self.request_stop(self.fenced)


class Worker:
    def __init__(
        self, settings: Settings, bus: Bus, store: ArtifactStore, runs: TrainerStore,
        outbox: Outbox,
    ):
        self.settings = settings
        self.bus = bus
        self.store = store
        self.runs = runs  # attempts run here: a redelivered finished one is a no-op
        self.outbox = outbox
        self.worker_id = default_worker_id(settings.worker_id)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.job: Job | None = None
        self.ended: tuple[str, int] = ("", 0)  # the last attempt run here (heartbeats say it)
        self.cancelled = RecentIds()  # cancels that arrived before their work item
        # releases (preempt, pause) that arrived before their work item: (job, attempt) -> why
        self.released_early: dict[tuple[str, int], str] = {}
        self.closing = False

    # -- liveness --------------------------------------------------------------------------
    async def heartbeat_loop(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def beat(self) -> None:
        job = self.job
        data = WorkerHeartbeat(
            worker_id=self.worker_id,
            # a worker shutting down takes no new work: placement only picks idle workers
            state="busy" if job else "draining" if self.closing else "idle",
            job_id=job.item.job_id if job else "",
            device=self.device,
            ended_job_id=self.ended[0],
            ended_attempt=self.ended[1],
            **self.hardware(),
        )
        try:
            await self.bus.publish_core(data)
        except Exception as e:  # noqa: BLE001 - a missed heartbeat is not fatal; the next one goes
            log.warning("heartbeat not sent: %s", e)

    def hardware(self) -> dict:
        """What placement checks a job against: memory a job may use now (free GPU memory,
        or available RAM), native bf16, GPUs and process slots. A failed probe reports unknown
        (0, False)."""
        try:
            if self.device == "cuda":
                free, _total = torch.cuda.mem_get_info()
                gpus = torch.cuda.device_count()
                return {"memory_bytes": int(free), "bf16": bool(torch.cuda.is_bf16_supported()),
                        "device_count": gpus, "slots": self.settings.worker_slots or gpus}
            memory, bf16 = cpu_hardware()
            return {"memory_bytes": memory, "bf16": bf16,
                    "slots": self.settings.worker_slots or os.cpu_count() or 1}
        except Exception as e:  # noqa: BLE001 - a heartbeat goes out whatever the probe does
            log.warning("hardware probe failed: %s", e)
            return {"memory_bytes": 0, "bf16": False}

    # -- commands from the bus ---------------------------------------------------------------
    async def accept(self, env: Envelope, item: WorkItem) -> None:
        """Start `item` in the background, or raise WorkerBusy; returns at once."""
        running = self.job
        if running and running.item.job_id == item.job_id:
            return  # redelivery of the job already running here
        if await self.runs.in_unit(Unit.finished, item.job_id, item.attempt):
            return  # redelivery of an attempt already run here
        if running:
            raise WorkerBusy(f"worker {self.worker_id} is busy with job {running.item.job_id}")
        if self.closing:
            raise WorkerBusy(f"worker {self.worker_id} is shutting down")
        job = Job(item, env.tenant, env.actor)
        if item.job_id in self.cancelled:  # the cancel overtook the work item
            await self._report(job, JobCancelled(job_id=item.job_id, reason=CANCELLED,
                                                 attempt=item.attempt))
            return
        if why := self.released_early.pop((item.job_id, item.attempt), ""):
            await self._report(job, JobReleased(job_id=item.job_id, worker_id=self.worker_id,
                                                attempt=item.attempt, step=0,
                                                reason=f"{why} before it started"))
            return
        self.job = job
        job.task = asyncio.create_task(self._run(job), name=f"job-{item.job_id}")
        await self.beat()  # tell the scheduler we are busy now, not at the next tick

    def release(self, request: JobReleaseRequested) -> None:
        """Hand the job back at its next step (preempted, paused): checkpoint, JobReleased."""
        if request.worker_id != self.worker_id:
            return
        job = self.job
        if job and (job.item.job_id, job.item.attempt) == (request.job_id, request.attempt):
            log.info("job %s: %s", request.job_id, request.reason)
            job.request_stop(request.reason)
        elif job is None or job.item.job_id != request.job_id:
            self.released_early[(request.job_id, request.attempt)] = request.reason

    def lease_revoked(self, requeued: JobRequeued) -> None:
        job = self.job
        if job and job.item.job_id == requeued.job_id:
            job.fence(requeued)

    async def holds(self, job: Job) -> bool:
        """Whether this worker still holds `job`: no later attempt was queued. Read from the
        stream, so it is true even right after the process was frozen; a broker that cannot be
        asked leaves the job running (an outage must not fail training)."""
        if not job.fenced:
            try:
                requeued = await self.bus.last_event(JobRequeued, job.item.job_id)
            except Exception as e:  # noqa: BLE001 - unknown: keep going, the scheduler fences
                log.warning("job %s: lease not checked: %s", job.item.job_id, e)
                return True
            if requeued is not None:
                job.fence(requeued)
        return not job.fenced

    def cancel(self, request: JobCancelRequested) -> None:
        if request.worker_id and request.worker_id != self.worker_id:
            return
        job = self.job
        if job and job.item.job_id == request.job_id:
            log.info("cancelling job %s", request.job_id)
            job.request_stop(CANCELLED)
        else:
            self.cancelled.add(request.job_id)

    async def stop(self) -> None:
        """Service shutdown: stop the running job at a step boundary and let it report."""
        self.closing = True
        job = self.job
        if job is None or job.task is None:
            return
        job.request_stop(SHUTDOWN)
        try:
            await asyncio.wait_for(asyncio.shield(job.task), STOP_GRACE_S)
        except TimeoutError:
            job.task.cancel()

    # -- the job -----------------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        item = job.item
        work_dir = self.settings.data_dir / "work" / item.job_id
        with tracer.start_as_current_span(f"train {item.job_id}",
                                          attributes={"job.id": item.job_id,
                                                      "job.attempt": item.attempt}):
            try:
                stored = await asyncio.to_thread(
                    checkpoint.download_latest_checkpoint, self.store, job.tenant, item.job_id,
                    work_dir)
                if stored is not None:
                    job.checkpoint_key = stored.prefix
                await self._report(job, JobStarted(
                    job_id=item.job_id, worker_id=self.worker_id, attempt=item.attempt,
                    resumed_from_step=stored.step if stored else 0))
                ctx = otel_context.get_current()
                loop = asyncio.get_running_loop()
                result = await asyncio.to_thread(self._train, job, work_dir, loop, ctx,
                                                 stored.local if stored else None)
                if await self.holds(job):
                    await self._report(job, self._outcome(job, result))
            except Exception as e:  # noqa: BLE001 - every failure is reported as JobFailed
                log.exception("job %s failed", item.job_id)
                if await self.holds(job):
                    await self._report_failure(job, e)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
                self.ended = (item.job_id, item.attempt)
                self.job = None
        await self.beat()

    def _train(self, job: Job, work_dir: Path, loop, ctx,
               resume_from: Path | None) -> TrainResult:
        """Runs in a worker thread: load inputs, train (from `resume_from`, the job's newest
        stored checkpoint), upload each checkpoint as it is written while the job is ours."""
        item = job.item
        try:
            spec = JobSpec.model_validate(item.spec)
        except ValidationError as e:
            raise ValueError(f"invalid job spec: {format_validation_error(e)}") from None
        check_local_model_dir(spec.base_model)
        key = check_tenant_key(train_split_key(item.dataset_artifacts), job.tenant,
                               "the dataset's train split")
        rows = parse_jsonl(self.store.get_bytes(key), self.store.uri(key))

        def call(coro: Coroutine):
            # Coroutines scheduled from a thread do not inherit a context: attach the job's.
            return asyncio.run_coroutine_threadsafe(_in_context(ctx, coro), loop).result()

        # Metrics samples are published without waiting for JetStream's ack in the training
        # step: the next sample (or the end of training) waits for the previous one, which has
        # had a whole step to finish. One sample in flight: in order, and never a backlog.
        in_flight: list[tuple[dict, Future]] = []

        def settle_metrics() -> None:
            while in_flight:
                m, sent = in_flight.pop()
                try:
                    sent.result()
                except Exception as e:  # noqa: BLE001 - a lost sample must not fail the job
                    log.warning("job %s: metrics at step %s not published: %s",
                                item.job_id, m.get("step"), e)

        def on_metrics(m: dict) -> None:
            settle_metrics()
            if job.fenced:
                return
            publish = self.bus.publish(metrics_event(item.job_id, m, item.attempt),
                                       tenant=job.tenant, actor=job.actor)
            in_flight.append(
                (m, asyncio.run_coroutine_threadsafe(_in_context(ctx, publish), loop)))

        def on_checkpoint(path: Path, step: int) -> None:
            # Stored and announced before training goes on, so a crash loses no reported step.
            # Only while the job is ours: a fenced attempt must not write over the next one's.
            if not call(self.holds(job)):
                return
            prefix = checkpoint.store_prefix(job.tenant, item.job_id, step)
            self.store.put_dir(prefix, path)
            call(self._report(job, JobCheckpointed(job_id=item.job_id, step=step,
                                                   checkpoint_key=prefix, attempt=item.attempt)))
            job.checkpoint_key = prefix
            checkpoint.prune_stored_checkpoints(
                self.store, job.tenant, item.job_id, spec.hyperparameters.keep_last_checkpoints
            )

        hp = spec.hyperparameters
        eval_rows = None
        if hp.eval_every or hp.early_stopping:
            eval_rows = self._split_rows(job, VALIDATION_SPLIT, "eval_every")
        try:
            return train_distributed(TrainRequest(  # the objective's recipe, in 1..N processes
                spec, rows, work_dir, eval_rows=eval_rows, on_metrics=on_metrics,
                on_checkpoint=on_checkpoint, should_stop=job.stop.is_set,
                resume_from=resume_from,
            ))
        finally:
            settle_metrics()  # the last sample is out before the outcome is reported

    # -- inputs ----------------------------------------------------------------------------------
    def _split_rows(self, job: Job, split: str, why: str) -> list[dict]:
        artifacts = job.item.dataset_artifacts
        key = artifacts.get(split)
        if not key:
            raise ValueError(
                f"hyperparameters.{why} needs a '{split}' split in the dataset "
                f"(splits: {sorted(artifacts) or 'none'})"
            )
        check_tenant_key(key, job.tenant, f"the dataset's {split} split")
        return parse_jsonl(self.store.get_bytes(key), self.store.uri(key))

    def _outcome(self, job: Job, result: TrainResult) -> EventData:
        item = job.item
        if result.stopped and job.stop_reason == CANCELLED:
            return JobCancelled(job_id=item.job_id, reason=CANCELLED, attempt=item.attempt)
        if result.stopped:  # handed back, to go on from its last checkpoint elsewhere
            why = (f"worker {self.worker_id} shutting down" if job.stop_reason == SHUTDOWN
                   else job.stop_reason)  # preempted by <job>, paused by <key>
            return JobReleased(
                job_id=item.job_id, worker_id=self.worker_id, attempt=item.attempt,
                step=result.steps, checkpoint_key=job.checkpoint_key,
                reason=f"{why} at step {result.steps}",
            )
        if not job.checkpoint_key:
            raise RuntimeError(f"training ended after {result.steps} steps without a checkpoint")
        return JobCompleted(
            job_id=item.job_id,
            worker_id=self.worker_id,
            model_name=item.model_name,
            spec=item.spec,
            dataset_id=item.dataset_id,
            dataset_sha256=item.dataset_sha256,
            dataset_artifacts=item.dataset_artifacts,
            checkpoint_key=job.checkpoint_key,
            adapter_key=job.checkpoint_key,  # the checkpoint holds the adapter files
            steps=result.steps,
            final_loss=result.final_loss,
            trace_id=telemetry.current_trace_id(),
            attempt=item.attempt,
        )

    async def _report_failure(self, job: Job, exc: Exception) -> None:
        event = JobFailed(job_id=job.item.job_id, reason=failure_reason(exc),
                          worker_id=self.worker_id, attempt=job.item.attempt)
        try:
            await self._report(job, event)
        except Exception:  # noqa: BLE001 - nothing left to tell; the scheduler's lease expires
            log.exception("job %s: JobFailed not recorded", job.item.job_id)

    async def _report(self, job: Job, data: EventData) -> None:
        """Record the run's new status and queue `data` in one transaction, then publish it
        (a failed publish is left to the outbox's background loop)."""
        item = job.item

        def write(u: Unit) -> None:
            u.record(item.job_id, item.attempt, tenant=job.tenant, worker_id=self.worker_id,
                     status=RUN_STATUS[type(data)],
                     checkpoint_key=getattr(data, "checkpoint_key", ""))
            self.outbox.add(u, data, tenant=job.tenant, actor=job.actor)

        await self.outbox.transact(write)


async def _in_context(ctx: otel_context.Context, coro: Coroutine):
    token = otel_context.attach(ctx)
    try:
        return await coro
    finally:
        otel_context.detach(token)

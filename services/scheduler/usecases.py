"""The scheduler's use cases: what users ask (JobService), what the dataset service and the workers
report (bus events), and placement (the queue -> work item step).

Each use case runs its database work in one transaction in a worker thread: `outbox.transact` when
it changes state (the events announcing the change are added to the outbox in that transaction),
`store.in_unit` when it only reads. After a change commits, the in-process watchers are told.
Errors are the kernel's domain errors (llmstudio.errors).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import IntegrityError

from llmstudio import telemetry
from llmstudio.auth import Principal
from llmstudio.bus import Bus
from llmstudio.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from llmstudio.events import (
    EventData,
    JobAssigned,
    JobCancelled,
    JobCancelRequested,
    JobFailed,
    JobPaused,
    JobQueued,
    JobReleaseRequested,
    JobRequeued,
    JobResumed,
    JobSubmitted,
    JobSucceeded,
    QuotaChanged,
    WorkItem,
)
from llmstudio.jobspec import JobSpec
from llmstudio.ml.memory import estimate_memory, model_config_of
from llmstudio.modelroots import check_model_root
from llmstudio.outbox import Outbox
from llmstudio.paging import Paged

from . import core
from .core import Happening, Job, Quota, Report, Status, Worker, WorkerTable, transition
from .store import JOBS, Conflict, SchedulerStore, Unit
from .watch import Update, Watchers

log = logging.getLogger(__name__)

R = TypeVar("R")
# A change racing another (placement, a worker's report, a second cancel) reads the job again and
# decides again, this many times in all.
CONFLICT_ATTEMPTS = 3
# Placement reads at least this many of each (tenant, class) queue's oldest jobs.
MIN_QUEUE_HEAD = 16
# Placement waits this long after a wake-up, so a burst of events makes one tick.
COALESCE_S = 0.05
# After a job's end, a WatchJob waits this long at most for samples not handled yet.
TRAILING_SAMPLES_S = 10.0
# A WatchJob with no update for this long re-reads its job (fan-out is best effort).
WATCH_REREAD_S = 5.0
WORK_STREAM = "WORK"


class Jobs:
    """What users ask of the scheduler: submit, read, cancel and watch jobs of their tenant (another
    tenant's job is NotFound)."""

    def __init__(
        self, store: SchedulerStore, outbox: Outbox, watchers: Watchers, workers: WorkerTable,
        model_roots: list[Path] | None = None,
    ):
        self.store = store
        self.outbox = outbox
        self.watchers = watchers
        self.workers = workers  # live workers: a spec none of them can run is refused
        self.model_roots = model_roots or []  # where a base_model may be (empty: anywhere)

    async def create(
        self, raw_spec: dict[str, Any], priority_class: str, idempotency_key: str,
        caller: Principal,
    ) -> Job:
        """Validate and store a job, announcing it (JobSubmitted). A retry with the same
        idempotency key gets back the job the first call created. The priority class is
        bounded by the caller's roles (core.ROLE_CEILING)."""
        priority = core.priority_class(priority_class, caller.roles)
        key = idempotency_key or None
        try:
            return await self.outbox.transact(
                self._add, raw_spec, priority, key, caller, self.workers.live())
        except IntegrityError:
            # The same key, submitted concurrently, won.
            existing = (await self.store.in_unit(Unit.job_by_key, caller.tenant, key)
                        if key else None)
            if existing is None:
                raise
            return existing

    def _add(self, u: Unit, raw_spec: dict[str, Any], priority: core.PriorityClass,
             key: str | None, caller: Principal, live: list[Worker]) -> Job:
        """The job checked, stored and announced, or the job an earlier call with its key
        created. The spec's checks read the model's config.json: in this unit's thread, before
        its first write (the transaction begins there)."""
        spec, estimate = _checked_spec(raw_spec, self.model_roots)
        refusal = core.refuse_on(spec, live)
        if refusal:
            raise FailedPrecondition(refusal)
        if key and (existing := u.job_by_key(caller.tenant, key)):
            return existing
        now = core.now_iso()
        job = Job(
            id="job-" + uuid.uuid4().hex[:12], tenant=caller.tenant,
            status=Status.VALIDATING_FILES, spec=spec.model_dump(mode="json"),
            model_name=spec.model_name(), dataset_id=spec.dataset, priority=int(priority),
            created_by=caller.key_id, created_at=now, updated_at=now,
            trace_id=telemetry.current_trace_id(), traceparent=telemetry.traceparent(),
            idempotency_key=key, memory_estimate=estimate,
        )
        # in the transaction that adds the job, so concurrent submits cannot both pass; counted
        # only under a queued quota (the count reads every waiting job of the tenant)
        quota = u.quota(job.tenant)
        if quota and quota.max_queued and (refusal := core.queued_quota_refusal(
                quota, u.waiting_count(job.tenant))):
            raise ResourceExhausted(refusal)
        u.add_job(job)
        self.outbox.add(u, JobSubmitted(
            job_id=job.id, dataset_id=job.dataset_id, model_name=job.model_name, spec=job.spec,
            priority=job.priority, priority_class=core.PriorityClass(job.priority).label,
        ), tenant=job.tenant, actor=job.created_by)
        return job

    async def get(self, job_id: str, tenant: str) -> Job:
        return await self.store.in_unit(_tenant_job, job_id, tenant)

    async def why_waiting(self, job: Job, aging_s: float) -> str:
        """Why a queued or paused job is not on a worker ('' for any other): quota, no able
        worker, the jobs ahead of it."""
        if job.status not in (Status.QUEUED, Status.PAUSED) or job.assigned:
            return ""
        queued, held, quota = await self.store.in_unit(_waiting_view, job.tenant)
        usage = core.Usage.of(held, self.workers)
        return core.why_waiting(job, queued, self.workers.live(), quota, usage,
                                aging_s=aging_s)

    async def set_quota(self, quota: Quota, caller: Principal) -> Quota:
        """Admins of the platform tenant set any tenant's quota, other admins their own's; the
        change is audited (QuotaChanged)."""
        if refusal := core.quota_access_refusal(caller.tenant, quota.tenant):
            raise PermissionDenied(refusal)
        quota = dataclasses.replace(quota, updated_by=caller.key_id, updated_at=core.now_iso())

        def write(u: Unit) -> Quota:
            u.set_quota(quota)
            self.outbox.add(u, QuotaChanged(
                tenant=quota.tenant, max_running=quota.max_running, max_queued=quota.max_queued,
                max_gpus=quota.max_gpus, max_cpu_slots=quota.max_cpu_slots,
                weight=quota.weight), tenant=quota.tenant, actor=caller.key_id)
            return quota

        return await self.outbox.transact(write)

    async def get_quota(self, tenant: str, caller: Principal) -> Quota:
        """A tenant's quota (none set: no limits, weight 1); another tenant's only for admins
        of the platform tenant."""
        if refusal := core.quota_access_refusal(caller.tenant, tenant):
            raise PermissionDenied(refusal)
        return await self.store.in_unit(Unit.quota, tenant) or Quota(tenant)

    async def list(self, tenant: str, status: Status | None, page_size: int = 0,
                   page_token: str = "") -> Paged[Job]:
        """A page of the tenant's jobs, newest first (default: the first 100)."""
        return await self.store.in_unit(Unit.jobs, tenant, status,
                                        JOBS.page(page_size, page_token))

    async def cancel(self, job_id: str, caller: Principal) -> Job:
        """Not yet on a worker: cancelled now (JobCancelled). On a worker: the worker is asked to
        stop (JobCancelRequested), and its JobCancelled ends the job.
        Finished: FailedPrecondition."""
        job: Job = await _retried(self.outbox.transact, self._cancel, job_id, caller)
        if job.status == Status.CANCELLED:
            self.watchers.status(job, f"cancelled by {caller.key_id}")
        return job

    def _cancel(self, u: Unit, job_id: str, caller: Principal) -> Job:
        job = _tenant_job(u, job_id, caller.tenant)
        if job.status.terminal:
            raise FailedPrecondition(f"job {job.id} is {job.status.value}")
        kw = {"tenant": job.tenant, "actor": caller.key_id}
        if job.assigned or job.status == Status.RUNNING:
            if not job.cancel_requested:
                job = u.save(dataclasses.replace(job, cancel_requested=True))
            self.outbox.add(u, JobCancelRequested(job_id=job.id, worker_id=job.worker_id), **kw)
            return job
        job = u.save(dataclasses.replace(job, status=Status.CANCELLED))
        self.outbox.add(u, JobCancelled(job_id=job.id, reason=f"cancelled by {caller.key_id}"),
                        **kw)
        return job

    async def pause(self, job_id: str, caller: Principal) -> Job:
        """Not on a worker: paused now (JobPaused), keeping its place in the queue. On a worker:
        the worker is asked to checkpoint and hand it back (JobReleaseRequested), and the job is
        paused then. Paused already: unchanged. Finished: FailedPrecondition."""
        job: Job = await _retried(self.outbox.transact, self._pause, job_id, caller)
        if job.status == Status.PAUSED:
            self.watchers.status(job, f"paused by {caller.key_id}")
        return job

    def _pause(self, u: Unit, job_id: str, caller: Principal) -> Job:
        job = _tenant_job(u, job_id, caller.tenant)
        if job.status == Status.PAUSED or job.pause_requested:
            return job
        if job.status not in (Status.QUEUED, Status.RUNNING):
            raise FailedPrecondition(f"job {job.id} is {job.status.value}: only a queued or "
                                     "running job can be paused")
        reason = f"paused by {caller.key_id}"
        kw = {"tenant": job.tenant, "actor": caller.key_id}
        if job.assigned:
            job = u.save(dataclasses.replace(job, pause_requested=True))
            self.outbox.add(u, JobReleaseRequested(job_id=job.id, worker_id=job.worker_id,
                                                   attempt=job.attempt, reason=reason), **kw)
            return job
        job = u.save(dataclasses.replace(job, status=Status.PAUSED))
        self.outbox.add(u, JobPaused(job_id=job.id, reason=reason), **kw)
        return job

    async def resume(self, job_id: str, caller: Principal) -> Job:
        """A paused job waits in the queue again, in its old place (JobResumed); one whose
        pause is still on its way to the worker goes back to the queue instead of pausing."""
        job: Job = await _retried(self.outbox.transact, self._resume, job_id, caller)
        self.watchers.status(job, f"resumed by {caller.key_id}")
        return job

    def _resume(self, u: Unit, job_id: str, caller: Principal) -> Job:
        job = _tenant_job(u, job_id, caller.tenant)
        if job.pause_requested:
            return u.save(dataclasses.replace(job, pause_requested=False))
        if job.status != Status.PAUSED:
            if job.status.terminal:
                raise FailedPrecondition(f"job {job.id} is {job.status.value}")
            return job  # not paused: nothing to resume
        job = u.save(dataclasses.replace(job, status=Status.QUEUED))
        self.outbox.add(u, JobResumed(job_id=job.id), tenant=job.tenant, actor=caller.key_id)
        return job

    async def watch(self, job_id: str, tenant: str) -> AsyncIterator[Update]:
        """The job's status, its stored metric samples, then live updates until it ends.

        The queue is opened before the job is read, so nothing between the read and the live
        part is lost; what was sent already is skipped (the same status, an older state of the
        job, a step sent before: updates from several replicas may arrive in any order)."""
        with self.watchers.watch(job_id) as queue:
            job = await self.get(job_id, tenant)
            yield Update("status", job, message=job.error)
            sent: set[int] = set()  # steps whose sample was sent
            for update in await _unsent_samples(self.store, job, sent):
                yield update
            status, version = job.status, job.version
            while not status.terminal:
                try:
                    update = await asyncio.wait_for(queue.get(), WATCH_REREAD_S)
                except TimeoutError:  # an update may have been lost (broker away): look
                    for missed in await _unsent_samples(self.store, job, sent):
                        yield missed
                    update = Update("status", await self.get(job_id, tenant))
                if update.kind == "metrics":
                    if update.step in sent:
                        continue
                    sent.add(update.step)
                elif update.kind == "status":
                    # the same status, or an older state of the job overtaken by a newer one
                    if update.job.status == status or update.job.version < version:
                        continue
                    status, version = update.job.status, update.job.version
                    if status.terminal:  # the samples still coming or not sent, then the end
                        async for trailing in _trailing_samples(queue, update.job, sent):
                            yield trailing
                        for missed in await _unsent_samples(self.store, update.job, sent):
                            yield missed
                yield update


class Reports:
    """What the dataset service and the workers report about jobs, applied to them.

    Delivery is at least once, so every report is idempotent: the state machine
    (`core.transition`) ignores a happening that no longer applies, and a metrics sample is
    stored once per step. A report is applied only to a job of the report's own tenant, and a
    worker's only while that worker holds the job. Reports of one job race each other (they come
    on several consumers): one that finds the job changed under it reads it again and applies
    again; if that keeps happening, the Conflict is raised for the bus to deliver it again."""

    def __init__(self, store: SchedulerStore, outbox: Outbox, watchers: Watchers, actor: str):
        self.store = store
        self.outbox = outbox
        self.watchers = watchers
        self.actor = actor

    async def dataset_validated(
        self, tenant: str, job_id: str, *, dataset_id: str, sha256: str,
        artifacts: dict[str, str],
    ) -> None:
        """The job's files are usable: it is queued (JobQueued) with the dataset's version."""

        def queue(u: Unit, job: Job) -> Job | None:
            status = transition(job.status, Happening.VALIDATED)
            if status is None:
                return None
            job = u.save(dataclasses.replace(
                job, status=status, dataset_id=dataset_id or job.dataset_id,
                dataset_sha256=sha256, dataset_artifacts=artifacts,
            ))
            self._announce(u, job, JobQueued(job_id=job.id, dataset_sha256=sha256))
            return job

        await self._change(tenant, job_id, "dataset.validated", queue)

    async def dataset_rejected(self, tenant: str, job_id: str, reason: str) -> None:
        """The job's files are unusable: it fails (JobFailed) with the dataset service's reason."""

        def fail(u: Unit, job: Job) -> Job | None:
            status = transition(job.status, Happening.REJECTED)
            if status is None:
                return None
            job = u.save(dataclasses.replace(job, status=status, error=reason))
            self._announce(u, job, JobFailed(job_id=job.id, reason=reason))
            return job

        await self._change(tenant, job_id, "dataset.rejected", fail)

    async def worker_reported(self, tenant: str, job_id: str, report: Report,
                              completion: dict[str, Any] | None = None) -> None:
        """A worker started, completed, failed or cancelled the job. A completion the job
        accepts is announced as JobSucceeded (`completion`: the worker's JobCompleted data):
        the one success downstream acts on."""

        def apply(u: Unit, job: Job) -> Job | None:
            changed = core.reported(job, report, core.now_iso())
            if changed is None:
                if report.stale(job):
                    log.warning("ignoring %s of %s attempt %d from %s: the job is at attempt "
                                "%d on %s", report.happening, job.id, report.attempt,
                                report.worker_id or "?", job.attempt, job.worker_id or "none")
                return None
            saved = u.save(changed)
            if saved.status == Status.SUCCEEDED and completion is not None:
                # in the job's own trace, by its submitter, as the worker's completion was
                self.outbox.add(u, JobSucceeded.model_validate(completion), tenant=saved.tenant,
                                actor=saved.created_by, traceparent=saved.traceparent)
            return saved

        await self._change(tenant, job_id, f"job.{report.happening}", apply, report.reason)

    async def worker_released(self, tenant: str, job_id: str, *, worker_id: str, attempt: int,
                              reason: str) -> None:
        """A worker handed the job back, checkpointed (it is shutting down): queued again as
        the next attempt, which resumes from that checkpoint. Not counted as a lost attempt."""

        def requeue(u: Unit, job: Job) -> Job | None:
            if attempt != job.attempt or worker_id != job.worker_id:
                return None  # an older attempt's, or a redelivery after the requeue
            return _requeue(u, self.outbox, job, f"released: {reason}", lost=False,
                            actor=self.actor)

        await self._change(tenant, job_id, "job.released", requeue, reason)

    async def checkpointed(self, tenant: str, job_id: str, step: int, key: str,
                           attempt: int) -> None:
        """A checkpoint of an active job's current attempt was stored: the job points at the
        newest one."""

        def record(u: Unit) -> Job | None:
            job = _reported_job(u, tenant, job_id, "job.checkpointed")
            if (job is None or job.status.terminal or job.attempt != attempt
                    or job.artifacts.get("checkpoint") == key):
                return None  # unknown, finished, another attempt's, or redelivered
            return u.save(dataclasses.replace(job, artifacts={**job.artifacts, "checkpoint": key}))

        job = await _retried(self.store.in_unit, record)
        if job is not None:
            self.watchers.checkpoint(job, step, key)

    async def metrics(self, tenant: str, job_id: str, step: int, sample: dict[str, float],
                      attempt: int) -> None:
        """A metrics sample of the current attempt: stored once per step (a resumed attempt
        repeats the steps after its checkpoint: the first sample of a step stays); the job keeps
        the newest by step."""

        def record(u: Unit) -> Job | None:
            job = _reported_job(u, tenant, job_id, "job.metrics")
            if job is None or (attempt != job.attempt and not job.status.terminal):
                return None
            if not u.add_sample(job.id, step, sample):
                return None
            # Samples travel on their own stream, so the last ones may land after the job
            # ended: the job keeps the newest sample by step.
            if step > job.metrics.get("step", -1):
                job = u.save(dataclasses.replace(
                    job, metrics=core.latest_metrics(job.metrics, sample)))
            return job

        job = await _retried(self.store.in_unit, record)
        if job is not None:
            self.watchers.metrics(job, step, sample)

    async def _change(
        self, tenant: str, job_id: str, what: str, change: Callable[[Unit, Job], Job | None],
        message: str = "",
    ) -> None:
        """`change` on the job in one transaction with its events; watchers are told."""

        def apply(u: Unit) -> Job | None:
            job = _reported_job(u, tenant, job_id, what)
            return change(u, job) if job else None

        changed = await _retried(self.outbox.transact, apply)
        if changed is not None:
            self.watchers.status(changed, message)

    def _announce(self, u: Unit, job: Job, event: EventData) -> None:
        self.outbox.add(u, event, tenant=job.tenant, actor=self.actor)


class Lease(Protocol):
    """Whether this replica may place jobs now (lease.LeaderLease)."""

    def held(self) -> bool: ...


class Placement:
    """Queued jobs onto idle live workers, and jobs back from lost workers: when something that
    may allow a placement happened (`wake`: a job queued, a worker free), at most every
    `interval_s` otherwise.

    Each tick:
    1. a job whose worker went silent (no heartbeat for the worker TTL: its lease expired) is
       taken back: its work item is purged and it is queued again as the next attempt
       (JobRequeued), which resumes from the job's newest stored checkpoint; the worker, should
       it come back, finds the job requeued and stops. A running job that loses its worker for
       the `max_attempts`-th time fails with the history of its attempts;
    2. waiting jobs are paired with free workers (`core.place`); the tick's assignments are
       saved in one transaction, each with its JobAssigned event and the WorkItem
       (llmstudio.work.<worker>), both published in the job's CreateJob trace so the worker's
       spans join it.
    A job that changed meanwhile (Conflict) is left to the next tick, which sees it as it is.
    """

    def __init__(
        self, store: SchedulerStore, outbox: Outbox, watchers: Watchers, workers: WorkerTable,
        bus: Bus, interval_s: float = 0.3, aging_s: float = 0.0,
        lease: Lease | None = None,
    ):
        self.store = store
        self.outbox = outbox
        self.watchers = watchers
        self.workers = workers
        self.bus = bus
        self.interval_s = interval_s
        self.aging_s = aging_s  # a waiting job's class rises by one per aging_s (core)
        self.lease = lease  # placement runs only while this replica holds it (None: always)
        # a heartbeat later than this after a job was first seen running here says what the
        # worker really does (an earlier one may have been sent before it started the job)
        self.settle_s = 2 * workers.ttl_s / 5
        self._running_since: dict[str, float] = {}
        # waiting job id -> (running job asked to make room for it, that job's worker): one
        # preemption per waiting job, held until the freed worker takes it or is lost
        self._preempting: dict[str, tuple[str, str]] = {}
        self._was_disconnected = False
        self._woken = asyncio.Event()
        watchers.on_status(lambda _job: self.wake())  # queued, ended, requeued, resumed...

    def wake(self) -> None:
        """Something happened that may allow a placement: tick soon."""
        self._woken.set()

    async def run(self) -> None:
        while True:
            try:
                if self.lease is None or self.lease.held():
                    await self.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not stop placement for good
                log.exception("placement tick failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.interval_s)
            self._woken.clear()
            await asyncio.sleep(COALESCE_S)  # what else happens meanwhile joins this tick

    async def tick(self) -> None:
        if self._missed_heartbeats():
            return
        # the heads of the queues are enough for the free workers; all of them only when a
        # round leaves a worker free behind a full head (e.g. jobs no free worker can run)
        per_queue = max(MIN_QUEUE_HEAD, 2 * len(self.workers.live()))
        waiting, held, quotas = await self.store.in_unit(_placement_view, per_queue)
        took_back = False
        for job in core.lost_assignments(held, self.workers):
            await self._take_back(job, f"worker {job.worker_id} lost (no heartbeat for "
                                       f"{self.workers.ttl_s:g}s)", lost=True)
            took_back = True
        running = [j for j in held if j.status == Status.RUNNING]
        now = self.workers.now()
        self._running_since = {j.id: self._running_since.get(j.id, now) for j in running}
        for job in core.disowned(running, self.workers, self._running_since, self.settle_s):
            worker = self.workers.get(job.worker_id)
            busy = worker is not None and worker.state == "busy" and worker.job_id
            doing = f"job {worker.job_id}" if busy and worker else "nothing"
            await self._take_back(job, f"worker {job.worker_id} reports running {doing}",
                                  lost=True)
            took_back = True
        if took_back:
            waiting, held, quotas = await self.store.in_unit(_placement_view, per_queue)
        placed, free = self._place(waiting, held, quotas)
        if len(placed) < free and _truncated(waiting, per_queue):
            waiting, held, quotas = await self.store.in_unit(_placement_view, 0)
            placed, _ = self._place(waiting, held, quotas)
        if placed:
            await self._assign([(waiting[job_id], worker_id) for job_id, worker_id in placed])
        if len(placed) < len(waiting):
            placed_ids = {job_id for job_id, _ in placed}
            unplaced = [j for j in core.placement_order(waiting.values(), aging_s=self.aging_s)
                        if j.id not in placed_ids]
            await self._preempt(unplaced, held)

    def _place(self, waiting: dict[str, Job], held: list[Job],
               quotas: dict[str, Quota]) -> tuple[list[tuple[str, str]], int]:
        """core.place on what was read, and how many workers were free for it."""
        live, holding = self.workers.live(), {j.worker_id for j in held}
        placed = core.place(waiting.values(), live, holding, aging_s=self.aging_s,
                            quotas=quotas, usage=core.Usage.of(held, self.workers))
        return placed, len(core.free_workers(live, holding))

    async def _preempt(self, unplaced: list[Job], held: list[Job]) -> None:
        """Waiting jobs no free worker could take may preempt running jobs of a lower class
        (core.preemptions): their workers are asked to checkpoint and hand them back. A waiting
        job asks once: its victim's worker may heartbeat busy for a while after the release."""
        running = [j for j in held if j.status == Status.RUNNING]
        candidates = [j for j in running if not (j.pause_requested or j.cancel_requested)]
        running_ids, holding = {j.id for j in running}, {j.worker_id for j in held}
        live = {w.worker_id for w in self.workers.live()}
        self._preempting = {
            job_id: (victim_id, worker_id)
            for job_id, (victim_id, worker_id) in self._preempting.items()
            if job_id in {j.id for j in unplaced}
            and (victim_id in running_ids or (worker_id in live and worker_id not in holding))
        }
        asked = {victim_id for victim_id, _ in self._preempting.values()}
        needing = [j for j in unplaced if j.id not in self._preempting]
        for victim, job in core.preemptions(needing, candidates, self.workers, asked):
            reason = f"preempted by {job.id}"

            def ask(u: Unit, victim: Job = victim, reason: str = reason) -> None:
                self.outbox.add(u, JobReleaseRequested(
                    job_id=victim.id, worker_id=victim.worker_id, attempt=victim.attempt,
                    reason=reason), tenant=victim.tenant, actor=self.bus.service)

            await self.outbox.transact(ask)
            self._preempting[job.id] = (victim.id, victim.worker_id)
            log.info("job %s (%s) on %s: %s (%s)", victim.id,
                     core.PriorityClass(victim.priority).label, victim.worker_id, reason,
                     core.PriorityClass(job.priority).label)

    def _missed_heartbeats(self) -> bool:
        """True while this scheduler's own broker connection is down (nothing can be decided
        about workers); once it is back, their silence meanwhile is forgiven."""
        connected = self.bus.nc.is_connected
        if not connected:
            self._was_disconnected = True
        elif self._was_disconnected:
            self._was_disconnected = False
            self.workers.forgive_silence()
            log.info("broker connection back: worker silence meanwhile forgiven")
        return not connected

    async def _assign(self, pairs: list[tuple[Job, str]]) -> None:
        """The tick's assignments in one transaction; a job that changed since it was read
        (Conflict) is left out, for the next tick to see as it is."""
        def assign(u: Unit) -> list[Job]:
            saved_jobs = []
            for job, worker_id in pairs:
                try:
                    saved = u.save(core.assigned(job, worker_id, core.now_iso()))
                except Conflict:
                    continue
                kw = {"tenant": saved.tenant, "actor": self.bus.service,
                      "traceparent": saved.traceparent}
                self.outbox.add(u, JobAssigned(job_id=saved.id, worker_id=worker_id,
                                               attempt=saved.attempt), **kw)
                self.outbox.add(u, WorkItem(
                    worker_id=worker_id, job_id=saved.id, model_name=saved.model_name,
                    spec=saved.spec, dataset_id=saved.dataset_id,
                    dataset_sha256=saved.dataset_sha256,
                    dataset_artifacts=saved.dataset_artifacts, attempt=saved.attempt,
                ), **kw)
                saved_jobs.append(saved)
            return saved_jobs

        for saved in await self.outbox.transact(assign):
            log.info("job %s (attempt %d) -> worker %s", saved.id, saved.attempt,
                     saved.worker_id)

    async def _take_back(self, job: Job, why: str, *, lost: bool) -> None:
        # The worker holds nothing else, so its whole subject is this job's work item: purge it
        # so the worker, if it comes back, does not run a job that is placed elsewhere.
        assert self.bus.js is not None, "bus not started"
        await self.bus.js.purge_stream(WORK_STREAM, subject=f"{WorkItem.SUBJECT}.{job.worker_id}")
        if job.cancel_requested:
            await self._give_up(job, Status.CANCELLED, f"cancelled; {why}")
            return
        started = job.status == Status.RUNNING
        if started and lost and core.exhausted(job):
            failed = job.with_current_attempt(reason=why, lost=True)
            await self._give_up(failed, Status.FAILED, f"{why}; {job.max_attempts} of "
                                f"max_attempts {job.max_attempts} attempts lost: "
                                f"{core.attempts_summary(failed)}")
            return

        def requeue(u: Unit) -> Job | None:
            return _requeue(u, self.outbox, job, why, lost=lost and started,
                            actor=self.bus.service)

        with contextlib.suppress(Conflict):
            saved = await self.outbox.transact(requeue)
            if saved is not None:
                log.warning("job %s: %s; queued again as attempt %d", job.id, why, saved.attempt)
                self.watchers.status(saved, f"{why}; requeued as attempt {saved.attempt}")

    async def _give_up(self, job: Job, status: Status, reason: str) -> None:
        """Fail or cancel a job placement gave up on, announcing it like a worker would."""
        event = (JobFailed(job_id=job.id, reason=reason, worker_id=job.worker_id,
                           attempt=job.attempt)
                 if status == Status.FAILED
                 else JobCancelled(job_id=job.id, reason=reason, attempt=job.attempt))
        current = job.current_attempt()
        ended = dataclasses.replace(
            job.with_current_attempt(ended_at=core.now_iso(),
                                     reason=current.reason if current and current.reason
                                     else reason),
            status=status, error=reason if status == Status.FAILED else "")

        def end(u: Unit) -> Job:
            saved = u.save(ended)
            self.outbox.add(u, event, tenant=saved.tenant, actor=self.bus.service)
            return saved

        with contextlib.suppress(Conflict):
            saved = await self.outbox.transact(end)
            log.warning("job %s: %s", job.id, reason)
            self.watchers.status(saved, reason)


# -- helpers -----------------------------------------------------------------------------------

def _requeue(u: Unit, outbox: Outbox, job: Job, reason: str, *, lost: bool,
             actor: str) -> Job | None:
    """Queue `job` again as its next attempt, announced (JobRequeued) in the same transaction."""
    again = core.requeued(job, reason, core.now_iso(), lost=lost)
    if again is None:
        return None
    saved = u.save(again)
    outbox.add(u, JobRequeued(job_id=saved.id, attempt=saved.attempt, worker_id=job.worker_id,
                              reason=reason), tenant=saved.tenant, actor=actor)
    if saved.status == Status.PAUSED:
        outbox.add(u, JobPaused(job_id=saved.id, reason=reason), tenant=saved.tenant,
                   actor=actor)
    return saved


async def _retried(run: Callable[..., Awaitable[R]], fn: Callable[..., R], *args: Any) -> R:
    """`run(fn, *args)` (`outbox.transact` or `store.in_unit`), run again when the job changed
    between its read and its save (Conflict): `fn` reads it again and decides again."""
    for _ in range(CONFLICT_ATTEMPTS - 1):
        with contextlib.suppress(Conflict):
            return await run(fn, *args)
    return await run(fn, *args)


async def _trailing_samples(queue: asyncio.Queue[Update], job: Job,
                            sent: set[int]) -> AsyncIterator[Update]:
    """Samples ride their own stream: some may be handled after the job's end (the last ones,
    or one redelivered after a replica died holding it). Every step a succeeded job logged
    (each `log_every`-th and its last, per its completion), for a while at most."""
    final = int(job.metrics.get("steps", 0))
    every = int(job.spec.get("hyperparameters", {}).get("log_every", 1)) or 1
    logged = {s for s in range(every, final + 1, every)} | ({final} if final else set())
    deadline = asyncio.get_running_loop().time() + TRAILING_SAMPLES_S
    while logged - sent:
        left = deadline - asyncio.get_running_loop().time()
        try:
            update = await asyncio.wait_for(queue.get(), max(left, 0.0))
        except TimeoutError:
            return
        if update.kind == "metrics" and update.step not in sent:
            sent.add(update.step)
            yield update


async def _unsent_samples(store: SchedulerStore, job: Job, sent: set[int]) -> list[Update]:
    """The job's stored samples not sent yet (marked sent), by step."""
    out = []
    for step, metrics in await store.in_unit(Unit.samples, job.id):
        if step not in sent:
            sent.add(step)
            out.append(Update("metrics", job, step=step, metrics=metrics))
    return out


def _tenant_job(u: Unit, job_id: str, tenant: str) -> Job:
    job = u.job(job_id, tenant) if job_id else None
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def _reported_job(u: Unit, tenant: str, job_id: str, what: str) -> Job | None:
    """The job a report is about, or None (logged) when it is unknown or another tenant's."""
    job = u.job(job_id)
    if job is None:
        log.info("ignoring %s for unknown job %s", what, job_id)
    elif job.tenant != tenant:
        log.warning("ignoring %s for job %s: event tenant %r is not the job's",
                    what, job_id, tenant)
        return None
    return job


def _placement_view(u: Unit, per_queue: int) -> tuple[dict[str, Job], list[Job],
                                                      dict[str, Quota]]:
    """The jobs waiting for a worker (by id; the heads of the queues: `Unit.waiting_jobs`),
    the jobs workers hold, every tenant's quota."""
    return {j.id: j for j in u.waiting_jobs(per_queue)}, u.assigned_jobs(), u.quotas()


def _truncated(waiting: dict[str, Job], per_queue: int) -> bool:
    """Some (tenant, class) queue was read only up to its head."""
    sizes = collections.Counter((j.tenant, j.priority) for j in waiting.values())
    return any(n >= per_queue for n in sizes.values())


def _waiting_view(u: Unit, tenant: str) -> tuple[list[Job], list[Job], Quota | None]:
    """What `why_waiting` weighs: every waiting job, the held ones, the tenant's quota."""
    return u.waiting_jobs(), u.assigned_jobs(), u.quota(tenant)


def _checked_spec(raw: dict[str, Any], model_roots: list[Path]) -> tuple[JobSpec, dict[str, float]]:
    """The validated spec (a local base model made absolute) and its memory estimate; reads
    the model's config.json, so it runs in a thread."""
    spec = _with_local_model(core.parse_spec(raw), model_roots)
    return spec, _memory_estimate(spec)


def _with_local_model(spec: JobSpec, model_roots: list[Path]) -> JobSpec:
    """A base_model written as a path (or naming one that exists) must be a model directory;
    it is stored absolute, so workers on this filesystem find it whatever their cwd. With
    model roots configured it must be under one of them, whatever it looks like (no hub id, no
    probing of other paths: llmstudio.modelroots)."""
    if model_roots:
        path = check_model_root("spec.base_model", spec.base_model, model_roots,
                                "LLMSTUDIO_MODEL_ROOTS")
    elif core.names_a_path(spec.base_model) or os.path.exists(spec.base_model):
        path = Path(spec.base_model).expanduser().resolve()
    else:
        return spec  # a hub id: workers with network load it
    assert path is not None
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

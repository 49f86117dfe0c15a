"""The placement loop: queued jobs onto idle live workers, and jobs back from lost workers.

Each tick:
1. a job assigned to a worker that went silent (no heartbeat for worker_ttl_s) before starting
   is taken back: its work item is purged and it waits for the next worker (attempt + 1);
   a running job whose worker went silent fails ("worker <id> lost");
2. waiting jobs are paired with free workers (`core.place`); each assignment is saved with its
   JobAssigned event and the WorkItem (llmstudio.work.<worker>), both published in the job's
   CreateJob trace so the worker's spans join it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from llmstudio.bus import Bus
from llmstudio.events import JobAssigned, JobCancelled, JobFailed, WorkItem

from .core import Job, Status, WorkerTable, lost_assignments, now_iso, place
from .outbox import Outbox
from .store import Conflict, SchedulerStore
from .watch import Watchers

log = logging.getLogger(__name__)

WORK_STREAM = "WORK"


class Placement:
    def __init__(
        self, store: SchedulerStore, outbox: Outbox, watchers: Watchers, workers: WorkerTable,
        bus: Bus, interval_s: float = 0.3,
    ):
        self.store = store
        self.outbox = outbox
        self.watchers = watchers
        self.workers = workers
        self.bus = bus
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not stop placement for good
                log.exception("placement tick failed; retrying")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        with self.store.unit() as u:
            assigned = u.assigned_jobs()
        take_back, fail = lost_assignments(assigned, self.workers)
        for job in take_back:
            await self._take_back(job)
        for job in fail:
            self._save_status(job, Status.FAILED, f"worker {job.worker_id} lost "
                              f"(no heartbeat for {self.workers.ttl_s:g}s)")

        with self.store.unit() as u:
            waiting = {j.id: j for j in u.waiting_jobs()}
            holding = {j.worker_id for j in u.assigned_jobs()}
        for job_id, worker_id in place(waiting.values(), self.workers.live(), holding):
            self._assign(waiting[job_id], worker_id)
        await self.outbox.flush()

    def _assign(self, job: Job, worker_id: str) -> None:
        try:
            with self.store.unit() as u:
                job = u.save(dataclasses.replace(job, worker_id=worker_id, assigned_at=now_iso()))
                kw = {"tenant": job.tenant, "actor": self.bus.service,
                      "traceparent": job.traceparent}
                self.outbox.add(u, JobAssigned(job_id=job.id, worker_id=worker_id,
                                               attempt=job.attempt), **kw)
                self.outbox.add(u, WorkItem(
                    worker_id=worker_id, job_id=job.id, model_name=job.model_name, spec=job.spec,
                    dataset_id=job.dataset_id, dataset_sha256=job.dataset_sha256,
                    dataset_artifacts=job.dataset_artifacts, attempt=job.attempt,
                ), **kw)
        except Conflict:
            return  # changed meanwhile (cancelled, say): the next tick sees it as it is now
        log.info("job %s (attempt %d) -> worker %s", job.id, job.attempt, worker_id)

    async def _take_back(self, job: Job) -> None:
        # The worker holds nothing else, so its whole subject is this job's work item: purge it
        # so the worker, if it comes back, does not run a job that is placed elsewhere.
        await self.bus.js.purge_stream(WORK_STREAM, subject=f"{WorkItem.SUBJECT}.{job.worker_id}")
        if job.cancel_requested:
            self._save_status(job, Status.CANCELLED, "cancelled before it started")
            return
        try:
            with self.store.unit() as u:
                u.save(dataclasses.replace(
                    job, worker_id="", assigned_at="", attempt=job.attempt + 1))
        except Conflict:
            return
        log.warning("job %s: worker %s lost before starting it; placing it again",
                    job.id, job.worker_id)

    def _save_status(self, job: Job, status: Status, reason: str) -> None:
        """Fail or cancel a job placement gave up on, announcing it like a worker would."""
        event = (JobFailed(job_id=job.id, reason=reason, worker_id=job.worker_id)
                 if status == Status.FAILED else JobCancelled(job_id=job.id, reason=reason))
        try:
            with self.store.unit() as u:
                job = u.save(dataclasses.replace(
                    job, status=status, error=reason if status == Status.FAILED else ""))
                self.outbox.add(u, event, tenant=job.tenant, actor=self.bus.service)
        except Conflict:
            return
        log.warning("job %s: %s", job.id, reason)
        self.watchers.status(job, reason)

"""Fan-out of job updates to WatchJob streams, across scheduler replicas.

Use cases call `status`/`metrics`/`checkpoint` after they commit. Each update goes straight to
this replica's open WatchJob streams (in the order the use cases ran), and with a bus
(`connect`) it is also published on core NATS (JobUpdated) for every other replica to hand to its
own: a client watching on one replica sees what another one changed. Core NATS may drop or
reorder an update: WatchJob dedupes, and re-reads its job now and then (usecases.Jobs.watch).

A stream holds at most WATCH_QUEUE_LIMIT unread updates (`UpdateQueue`): a client reading slower
than its job reports loses its oldest queued metric samples, which Jobs.watch reads back from
the store (on its re-read, and when the job ends), so it still sees every sample, late; with no
sample queued, its oldest update goes (a status the newer ones queued after it supersede).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from llmstudio.bus import Bus
from llmstudio.events import Envelope, JobUpdated

from .core import Job, job_from_dict, job_to_dict

log = logging.getLogger(__name__)


# Unread updates one WatchJob stream may hold: at most a few MiB of jobs per stream.
WATCH_QUEUE_LIMIT = 256


@dataclass(frozen=True)
class Update:
    kind: str  # "status" | "metrics" | "checkpoint"
    job: Job
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


class UpdateQueue(asyncio.Queue[Update]):
    """The updates one stream has not read, `limit` at most (see the module's docstring)."""

    _queue: deque[Update]  # asyncio.Queue's own store (`_init`, `_put`, `_get` are its hooks)

    def __init__(self, limit: int = WATCH_QUEUE_LIMIT):
        super().__init__()  # unbounded to asyncio, so a put never waits; `_put` bounds it
        self.limit = limit

    def _put(self, item: Update) -> None:
        if len(self._queue) >= self.limit:
            unread = self._queue
            unread.remove(next((u for u in unread if u.kind == "metrics"), unread[0]))
        super()._put(item)


class Watchers:
    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[Update]]] = defaultdict(set)
        self._bus: Bus | None = None
        self._sending: set[asyncio.Task] = set()
        self._status_listeners: list[Callable[[Job], None]] = []
        self._origin = uuid.uuid4().hex  # this replica, in the updates it fans out

    def connect(self, bus: Bus) -> None:
        """Fan updates out over `bus` to every replica (this one included)."""
        self._bus = bus
        bus.subscribe_core(JobUpdated, self._on_update)

    def on_status(self, listener: Callable[[Job], None]) -> None:
        """Call `listener` with the job at each status change (this replica's or another's)."""
        self._status_listeners.append(listener)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Queue[Update]]:
        queue = UpdateQueue()
        self._queues[job_id].add(queue)
        try:
            yield queue
        finally:
            self._queues[job_id].discard(queue)
            if not self._queues[job_id]:
                del self._queues[job_id]

    def status(self, job: Job, message: str = "") -> None:
        self._send(Update("status", job, message=message or job.error))

    def metrics(self, job: Job, step: int, metrics: dict[str, float]) -> None:
        self._send(Update("metrics", job, step=step, metrics=metrics))

    def checkpoint(self, job: Job, step: int, key: str) -> None:
        self._send(Update("checkpoint", job, step=step, message=key))

    def _send(self, update: Update) -> None:
        self._deliver(update)
        if self._bus is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(update))
        self._sending.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._sending.discard)

    async def _publish(self, update: Update) -> None:
        assert self._bus is not None
        try:
            await self._bus.publish_core(JobUpdated(
                job_id=update.job.id, kind=update.kind, job=job_to_dict(update.job),
                step=update.step, metrics=update.metrics, message=update.message,
                origin=self._origin,
            ), tenant=update.job.tenant)
        except Exception as e:  # noqa: BLE001 - watchers re-read the job (Jobs.watch)
            log.warning("job %s update not fanned out: %s", update.job.id, e)

    async def _on_update(self, env: Envelope, data: JobUpdated) -> None:
        if data.origin == self._origin:
            return  # delivered when it was sent
        job = job_from_dict(data.job)
        if job.tenant != env.tenant or job.id != data.job_id:
            return
        self._deliver(Update(data.kind, job, data.step, dict(data.metrics), data.message))

    def _deliver(self, update: Update) -> None:
        for queue in self._queues.get(update.job.id, ()):
            queue.put_nowait(update)
        if update.kind == "status":
            for listener in self._status_listeners:
                listener(update.job)

"""In-process fan-out of job updates to WatchJob streams.

Use cases call `status`/`metrics`/`checkpoint` after they commit; each open WatchJob holds a
queue for its job. Updates are only those this process handled: one scheduler per bus.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .core import Job


@dataclass(frozen=True)
class Update:
    kind: str  # "status" | "metrics" | "checkpoint"
    job: Job
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


class Watchers:
    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[Update]]] = defaultdict(set)

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Queue[Update]]:
        queue: asyncio.Queue[Update] = asyncio.Queue()
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
        for queue in self._queues.get(update.job.id, ()):
            queue.put_nowait(update)

"""The scheduler's transactional outbox: the shared one (`llmstudio.outbox`) on the scheduler's
store, table `scheduler_outbox`.

A use case never fails because publishing did: `flush()` logs the failure and leaves the rows to
the background loop (every 2 s). A work item is queued with its job's CreateJob trace
(`add(..., traceparent=job.traceparent)`), so a worker's spans join the job's trace.
"""

from __future__ import annotations

from llmstudio import outbox
from llmstudio.bus import Bus

from .store import SchedulerStore


class Outbox(outbox.Outbox):
    def __init__(self, store: SchedulerStore, bus: Bus):
        super().__init__(store, bus, interval_s=2.0)

    async def flush(self) -> None:
        """Publish every queued event; on failure log it and leave the rest to `run()`."""
        await self.try_flush()

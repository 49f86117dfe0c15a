"""Bus handlers of the trainer-worker: they hand events to the Worker and return at once."""

from __future__ import annotations

import logging

from llmstudio.bus import Bus
from llmstudio.events import (
    Envelope,
    EventData,
    JobCancelRequested,
    JobReleaseRequested,
    JobRequeued,
    WorkItem,
)

from .worker import Worker

log = logging.getLogger(__name__)

# Per-worker consumers vanish an hour after their worker does, instead of piling up.
CONSUMER_TTL_S = 3600


def subscribe(bus: Bus, worker: Worker) -> None:
    async def on_work(env: Envelope, data: EventData) -> None:
        if not isinstance(data, WorkItem):
            log.warning("ignoring %s on this worker's work subject", env.type)
            return
        await worker.accept(env, data)  # raises WorkerBusy -> redelivered later

    async def on_cancel(env: Envelope, data: EventData) -> None:
        if isinstance(data, JobCancelRequested):
            worker.cancel(data)

    async def on_release(env: Envelope, data: EventData) -> None:
        if isinstance(data, JobReleaseRequested):
            worker.release(data)

    async def on_requeued(env: Envelope, data: EventData) -> None:
        if isinstance(data, JobRequeued):
            worker.lease_revoked(data)

    wid = worker.worker_id
    bus.subscribe(WorkItem, durable=f"work-{wid}", handler=on_work, entity=wid,
                  inactive_threshold_s=CONSUMER_TTL_S)
    # Only cancels issued from now on matter to a fresh worker; every worker sees each one.
    bus.subscribe(JobCancelRequested, durable=f"cancel-{wid}", handler=on_cancel,
                  deliver_new=True, inactive_threshold_s=CONSUMER_TTL_S)
    # Preempted or paused: hand the job back at its next step.
    bus.subscribe(JobReleaseRequested, durable=f"release-{wid}", handler=on_release,
                  deliver_new=True, inactive_threshold_s=CONSUMER_TTL_S)
    # A job taken back from this worker (it was silent past the TTL) stops here.
    bus.subscribe(JobRequeued, durable=f"requeued-{wid}", handler=on_requeued,
                  deliver_new=True, inactive_threshold_s=CONSUMER_TTL_S)

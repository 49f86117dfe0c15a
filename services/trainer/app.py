"""Wiring of the trainer-worker: its store (runs and outbox, migrated at start), no gRPC, two
consumers, a heartbeat, the outbox loop, a graceful stop."""

from __future__ import annotations

import asyncio

from llmstudio.grpcutil import Registration
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime

from . import handlers
from .store import TrainerStore
from .worker import Worker


async def build(rt: Runtime) -> list[Registration]:
    runs = TrainerStore(rt.settings.db_url("trainer"))
    await asyncio.to_thread(runs.migrate)
    # A report is recorded even when NATS is away; the background loop publishes it later.
    outbox = Outbox(runs, rt.bus, interval_s=2.0, defer_failures=True)
    worker = Worker(rt.settings, rt.bus, rt.artifact_store(), runs, outbox)
    handlers.subscribe(rt.bus, worker)
    rt.background.append(worker.heartbeat_loop)
    rt.background.append(outbox.run)

    async def close() -> None:
        await worker.stop()
        await outbox.try_flush()  # the outcome of a job stopped just now
        runs.dispose()

    rt.on_stop.append(close)
    return []

"""Wiring of the trainer-worker: no gRPC, two consumers, a heartbeat, a graceful stop."""

from __future__ import annotations

from llmstudio.grpcutil import Registration
from llmstudio.service import Runtime

from . import handlers
from .worker import Worker


async def build(rt: Runtime) -> list[Registration]:
    worker = Worker(rt.settings, rt.bus, rt.artifact_store())
    handlers.subscribe(rt.bus, worker)
    rt.background.append(worker.heartbeat_loop)
    rt.on_stop.append(worker.stop)
    return []

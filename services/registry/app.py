"""Wiring of the registry: store (migrated at start), outbox, use cases, bus handlers and the
gRPC servicer."""

from __future__ import annotations

import asyncio

from llmstudio.events import EvalCompleted, JobSucceeded, PolicyChanged, PolicyDecided
from llmstudio.grpcutil import Registration
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime
from llmstudio.v1 import registry_pb2_grpc

from .api import RegistryApi
from .handlers import RegistryHandlers
from .store import RegistryStore
from .usecases import Registry


async def build(rt: Runtime) -> list[Registration]:
    store = RegistryStore(rt.settings.db_url("registry"))
    await asyncio.to_thread(store.migrate)
    # A committed change is reported as made; its events wait in the outbox while NATS is down.
    outbox = Outbox(store, rt.bus, defer_failures=True)
    registry = Registry(store, outbox, rt.artifact_store())  # DownloadArtifact reads it
    handlers = RegistryHandlers(registry)
    rt.bus.subscribe(JobSucceeded, durable="job-succeeded", handler=handlers.on_job_succeeded)
    rt.bus.subscribe(EvalCompleted, durable="eval-completed",
                     handler=handlers.on_eval_completed)
    rt.bus.subscribe(PolicyDecided, durable="policy-decided", handler=handlers.on_policy_decided)
    rt.bus.subscribe(PolicyChanged, durable="policy-changed", handler=handlers.on_policy_changed)
    rt.background.append(outbox.run)

    async def dispose() -> None:
        store.dispose()

    rt.on_stop.append(dispose)
    return [
        Registration(
            add=registry_pb2_grpc.add_RegistryServiceServicer_to_server,
            servicer=RegistryApi(registry),
            full_name="llmstudio.v1.RegistryService",
        )
    ]

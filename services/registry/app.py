"""Wiring of the registry: store, outbox, bus handlers and the gRPC servicer."""

from __future__ import annotations

from llmstudio.events import EvalCompleted, JobCompleted
from llmstudio.grpcutil import Registration
from llmstudio.service import Runtime
from llmstudio.v1 import registry_pb2_grpc

from .api import RegistryApi
from .handlers import RegistryHandlers
from .outbox import Outbox
from .store import RegistryStore


async def build(rt: Runtime) -> list[Registration]:
    store = RegistryStore(rt.settings.db_url("registry"))
    store.create_tables()
    outbox = Outbox(store, rt.bus)
    handlers = RegistryHandlers(store, outbox)
    rt.bus.subscribe(JobCompleted, durable="job-completed", handler=handlers.on_job_completed)
    rt.bus.subscribe(EvalCompleted, durable="eval-completed",
                     handler=handlers.on_eval_completed)
    rt.background.append(outbox.run)

    async def dispose() -> None:
        store.dispose()

    rt.on_stop.append(dispose)
    return [
        Registration(
            add=registry_pb2_grpc.add_RegistryServiceServicer_to_server,
            servicer=RegistryApi(store, outbox),
            full_name="llmstudio.v1.RegistryService",
        )
    ]

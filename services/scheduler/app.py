"""Wiring of the scheduler: store, outbox, worker table, bus handlers, placement loop and the
gRPC servicer."""

from __future__ import annotations

from llmstudio.grpcutil import Registration
from llmstudio.service import Runtime
from llmstudio.v1 import jobs_pb2_grpc

from .api import JobApi
from .core import WorkerTable
from .handlers import Handlers
from .outbox import Outbox
from .placement import Placement
from .store import SchedulerStore
from .watch import Watchers


async def build(rt: Runtime) -> list[Registration]:
    store = SchedulerStore(rt.settings.db_url(rt.name))
    store.create_tables()
    outbox = Outbox(store, rt.bus)
    watchers = Watchers()
    workers = WorkerTable(rt.settings.worker_ttl_s)
    Handlers(store, outbox, watchers, workers, actor=rt.name).subscribe(rt.bus)
    placement = Placement(store, outbox, watchers, workers, rt.bus)
    rt.background += [outbox.run, placement.run]

    async def dispose() -> None:
        store.dispose()

    rt.on_stop.append(dispose)
    return [
        Registration(
            add=jobs_pb2_grpc.add_JobServiceServicer_to_server,
            servicer=JobApi(store, outbox, watchers, actor=rt.name, workers=workers),
            full_name="llmstudio.v1.JobService",
        )
    ]

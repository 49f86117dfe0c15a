"""Wiring of the dataset service: its store (migrated at start), outbox, use cases, bus handler
and gRPC servicer."""

from __future__ import annotations

import asyncio

from llmstudio.commands import Command, serve_commands
from llmstudio.grpcutil import Registration
from llmstudio.ml.allocator import return_freed_tensors_to_os
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc

from .api import DatasetApi
from .handlers import DatasetHandlers
from .store import DatasetStore
from .usecases import Datasets


async def build(rt: Runtime) -> list[Registration]:
    # Upload chunks and per-row arrays are large blocks freed over and over: pin glibc's mmap
    # threshold so they go back to the OS instead of growing the heap (peak RSS of an ingest).
    return_freed_tensors_to_os()
    store = DatasetStore(rt.settings.db_url("dataset"))
    await asyncio.to_thread(store.migrate)
    # A stored version is reported as made even if NATS is down: its event waits in the outbox.
    outbox = Outbox(store, rt.bus, defer_failures=True)
    datasets = Datasets(store, outbox, rt.artifact_store(), rt.settings)
    await asyncio.to_thread(datasets.spool.clear)  # this process owns the spool from now on
    DatasetHandlers(datasets).subscribe(rt.bus)

    async def close() -> None:
        datasets.close()
        store.dispose()

    rt.background.append(outbox.run)  # also publishes what a crash left in the outbox
    rt.on_stop.append(close)
    api = DatasetApi(datasets)
    # external automation's commands: the same use cases, authorized as the RPCs
    serve_commands(rt.bus, rt.keys, "datasets", api, {
        "import": Command("ImportDataset", datasets_pb2.ImportDatasetRequest),
        "derive": Command("DeriveDataset", datasets_pb2.DeriveDatasetRequest),
    })
    return [
        Registration(
            add=datasets_pb2_grpc.add_DatasetServiceServicer_to_server,
            servicer=api,
            full_name="llmstudio.v1.DatasetService",
        )
    ]

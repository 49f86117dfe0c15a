"""Wiring of the dataset service: its store, artifact store, bus handler and gRPC servicer."""

from __future__ import annotations

import asyncio

from llmstudio.events import JobSubmitted
from llmstudio.grpcutil import Registration
from llmstudio.ml.allocator import return_freed_tensors_to_os
from llmstudio.service import Runtime
from llmstudio.v1 import datasets_pb2_grpc

from .api import DatasetApi, announce
from .handlers import JobDatasetCheck
from .store import DatasetStore


async def build(rt: Runtime) -> list[Registration]:
    # Upload chunks and per-row arrays are large blocks freed over and over: pin glibc's mmap
    # threshold so they go back to the OS instead of growing the heap (peak RSS of an ingest).
    return_freed_tensors_to_os()
    store = DatasetStore(rt.settings.db_url("dataset"))
    await asyncio.to_thread(store.create_tables)
    artifacts = rt.artifact_store()
    jobs = JobDatasetCheck(store, artifacts, rt.bus)
    rt.bus.subscribe(JobSubmitted, durable="job-submitted", handler=jobs.on_job_submitted)

    async def announce_pending() -> None:
        # Datasets stored just before a crash, whose DatasetRegistered never went out.
        for record in await asyncio.to_thread(store.unannounced):
            await announce(rt.bus, store, record)

    servicer = DatasetApi(store, artifacts, rt.bus, rt.settings)
    await asyncio.to_thread(servicer.clear_spool)  # this process owns the spool from now on

    async def close() -> None:
        servicer.ingest_pool.shutdown(wait=False, cancel_futures=True)
        store.close()

    rt.on_started.append(announce_pending)
    rt.on_stop.append(close)
    return [
        Registration(
            add=datasets_pb2_grpc.add_DatasetServiceServicer_to_server,
            servicer=servicer,
            full_name="llmstudio.v1.DatasetService",
        )
    ]

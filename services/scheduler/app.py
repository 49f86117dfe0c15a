"""Wiring of the scheduler: store (migrated at start), outbox, worker table, use cases, bus
handlers, placement loop and the gRPC servicer."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

from llmstudio.commands import Command, serve_commands
from llmstudio.grpcutil import Registration
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime
from llmstudio.v1 import jobs_pb2, jobs_pb2_grpc

from .api import JobApi
from .core import WorkerTable
from .handlers import Handlers
from .lease import LeaderLease
from .store import SchedulerStore
from .usecases import Jobs, Placement, Reports
from .watch import Watchers


async def build(rt: Runtime) -> list[Registration]:
    store = SchedulerStore(rt.settings.db_url(rt.name))
    await asyncio.to_thread(store.migrate)
    # A use case never fails because publishing did; a work item carries its job's CreateJob
    # trace (`add(..., traceparent=job.traceparent)`), so a worker's spans join the job's trace.
    outbox = Outbox(store, rt.bus, interval_s=2.0, defer_failures=True)
    watchers = Watchers()
    watchers.connect(rt.bus)  # updates reach the WatchJob streams of every replica
    workers = WorkerTable(rt.settings.worker_ttl_s)
    # Replicas share the database; one of them, the lease holder, places jobs.
    replica = (rt.settings.replica_id
               or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    lease = LeaderLease(rt.bus, replica, rt.settings.scheduler_lease_ttl_s)
    placement = Placement(store, outbox, watchers, workers, rt.bus,
                          aging_s=rt.settings.priority_aging_s, lease=lease)
    Handlers(Reports(store, outbox, watchers, actor=rt.name), workers,
             worker_freed=placement.wake).subscribe(rt.bus)
    rt.background += [outbox.run, lease.run, placement.run]

    async def dispose() -> None:
        store.dispose()

    rt.on_stop.append(dispose)
    api = JobApi(Jobs(store, outbox, watchers, workers, rt.settings.model_roots),
                 aging_s=rt.settings.priority_aging_s)
    # external automation's commands: the same use cases, authorized as the RPCs
    serve_commands(rt.bus, rt.keys, "jobs", api, {
        "create": Command("CreateJob", jobs_pb2.CreateJobRequest),
        "cancel": Command("CancelJob", jobs_pb2.CancelJobRequest),
        "pause": Command("PauseJob", jobs_pb2.PauseJobRequest),
        "resume": Command("ResumeJob", jobs_pb2.ResumeJobRequest),
    })
    return [
        Registration(
            add=jobs_pb2_grpc.add_JobServiceServicer_to_server,
            servicer=api,
            full_name="llmstudio.v1.JobService",
        )
    ]

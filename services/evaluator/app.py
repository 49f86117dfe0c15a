"""Wiring of the evaluator: its store (migrated at start), outbox, the job.completed consumer,
the gRPC servicer."""

from __future__ import annotations

import asyncio

from llmstudio.grpcutil import Registration
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime
from llmstudio.v1 import evaluation_pb2_grpc

from .api import EvaluationServicer
from .handlers import EvaluatorHandlers
from .store import EvaluationStore
from .usecases import EvaluationRunner, Evaluations


async def build(rt: Runtime) -> list[Registration]:
    store = EvaluationStore(rt.settings.db_url("evaluator"))
    await asyncio.to_thread(store.migrate)
    # the outcome is committed whether or not NATS takes its event now: run() publishes it later
    outbox = Outbox(store, rt.bus, defer_failures=True)
    settings = rt.settings
    runner = EvaluationRunner(
        store, outbox, rt.artifact_store(), settings.data_dir, model_roots=settings.model_roots,
        task_roots=[*settings.model_roots, *settings.dataset_import_roots])
    EvaluatorHandlers(runner).subscribe(rt.bus)
    rt.on_started.append(runner.resume)
    rt.background.append(outbox.run)  # publishes what a failed flush or a crash left behind

    async def stop() -> None:
        await runner.stop()
        store.dispose()

    rt.on_stop.append(stop)
    return [
        Registration(
            add=evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server,
            servicer=EvaluationServicer(Evaluations(store), runner),
            full_name="llmstudio.v1.EvaluationService",
        )
    ]

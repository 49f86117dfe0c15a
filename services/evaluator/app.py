"""Wiring of the evaluator: its store, the job.completed consumer, the gRPC servicer."""

from __future__ import annotations

from llmstudio.grpcutil import Registration
from llmstudio.service import Runtime
from llmstudio.v1 import evaluation_pb2_grpc

from .api import EvaluationServicer
from .handlers import Evaluations
from .store import EvaluationStore


async def build(rt: Runtime) -> list[Registration]:
    store = EvaluationStore(rt.settings.db_url("evaluator"))
    evaluations = Evaluations(rt.settings, rt.bus, store, rt.artifact_store())
    evaluations.subscribe()
    rt.on_started.append(evaluations.resume)
    rt.on_stop.append(evaluations.stop)
    return [
        Registration(
            add=evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server,
            servicer=EvaluationServicer(store),
            full_name="llmstudio.v1.EvaluationService",
        )
    ]

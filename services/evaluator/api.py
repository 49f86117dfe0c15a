"""gRPC EvaluationService: read evaluations of the caller's tenant."""

from __future__ import annotations

from llmstudio.auth import current_principal
from llmstudio.errors import InvalidArgument, NotFound
from llmstudio.v1 import evaluation_pb2, evaluation_pb2_grpc

from .core import Evaluation
from .store import EvaluationStore


def to_proto(ev: Evaluation) -> evaluation_pb2.Evaluation:
    return evaluation_pb2.Evaluation(
        id=ev.id,
        job_id=ev.job_id,
        tenant=ev.tenant,
        status=ev.status,
        base_metrics=ev.base_metrics,
        tuned_metrics=ev.tuned_metrics,
        report_key=ev.report_key,
        error=ev.error,
        created_at=ev.created_at.isoformat(),
    )


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    PERMISSIONS = {"GetEvaluation": "read", "ListEvaluations": "read"}

    def __init__(self, store: EvaluationStore):
        self.store = store

    async def GetEvaluation(self, request, context):
        if not request.id:
            raise InvalidArgument("id", "required")
        # Another tenant's evaluation is indistinguishable from a missing one.
        ev = self.store.get(request.id, current_principal().tenant)
        if ev is None:
            raise NotFound(f"evaluation {request.id} not found")
        return to_proto(ev)

    async def ListEvaluations(self, request, context):
        evs = self.store.list(current_principal().tenant, job_id=request.job_id)
        return evaluation_pb2.ListEvaluationsResponse(evaluations=[to_proto(e) for e in evs])

"""gRPC EvaluationService: read evaluations of the caller's tenant (use case `Evaluations`)."""

from __future__ import annotations

from llmstudio.auth import current_principal
from llmstudio.v1 import evaluation_pb2, evaluation_pb2_grpc

from .core import Evaluation
from .usecases import Evaluations


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

    def __init__(self, evaluations: Evaluations):
        self.evaluations = evaluations

    async def GetEvaluation(self, request, context):
        return to_proto(await self.evaluations.get(request.id, current_principal().tenant))

    async def ListEvaluations(self, request, context):
        evs = await self.evaluations.list(current_principal().tenant, request.job_id,
                                          request.page_size, request.page_token)
        return evaluation_pb2.ListEvaluationsResponse(evaluations=[to_proto(e) for e in evs],
                                                      next_page_token=evs.next_page_token)

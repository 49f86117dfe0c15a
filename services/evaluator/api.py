"""gRPC EvaluationService: create evaluations on demand (use case `EvaluationRunner.request`),
read evaluations of the caller's tenant (use case `Evaluations`)."""

from __future__ import annotations

from llmstudio.auth import current_principal
from llmstudio.v1 import evaluation_pb2, evaluation_pb2_grpc

from .core import Evaluation, validate_request
from .usecases import EvaluationRunner, Evaluations


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
        comparisons=[evaluation_pb2.MetricComparison(**c) for c in ev.comparisons],
        model_name=ev.request.get("model_name", "") or ev.job.get("model_name", ""),
        version=ev.request.get("version", 0),
        base_model=ev.request.get("base_model", "") or ev.job.get("spec", {}).get(
            "base_model", ""),
        dataset_id=ev.request.get("dataset_id", "") or ev.job.get("dataset_id", ""),
        split=ev.request.get("split", "validation"),
        suite=ev.request.get("suite", "default"),
    )


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    PERMISSIONS = {"CreateEvaluation": "write", "GetEvaluation": "read",
                   "ListEvaluations": "read"}

    def __init__(self, evaluations: Evaluations, runner: EvaluationRunner):
        self.evaluations = evaluations
        self.runner = runner

    async def CreateEvaluation(self, request, context):
        principal = current_principal()
        r = validate_request(
            model_name=request.model_name, version=request.version,
            base_model=request.base_model, dataset_id=request.dataset_id, split=request.split,
            suite=request.suite, metrics=list(request.metrics),
            tasks=[{"name": t.name, "dataset_id": t.dataset_id, "key": t.key, "path": t.path,
                    "scoring": t.scoring} for t in request.tasks],
            max_samples=request.max_samples, max_new_tokens=request.max_new_tokens,
            resamples=request.bootstrap_samples, seed=request.seed,
            idempotency_key=request.idempotency_key)
        ev = await self.runner.request(r, tenant=principal.tenant,
                                        actor=principal.name or principal.key_id)
        return to_proto(ev)

    async def GetEvaluation(self, request, context):
        return to_proto(await self.evaluations.get(request.id, current_principal().tenant))

    async def ListEvaluations(self, request, context):
        evs = await self.evaluations.list(current_principal().tenant, request.job_id,
                                          request.page_size, request.page_token)
        return evaluation_pb2.ListEvaluationsResponse(evaluations=[to_proto(e) for e in evs],
                                                      next_page_token=evs.next_page_token)

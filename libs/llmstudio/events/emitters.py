"""Which service may emit each event type: what a consumer checks beside the signature
(`llmstudio.signing`). Every registered type is listed (a unit test checks it)."""

from __future__ import annotations

from . import datasets, evaluation, governance, jobs, registry, serving
from .base import EventData

ANY_SERVICE = frozenset({"dataset", "scheduler", "trainer", "evaluator", "registry", "governance",
                         "serving"})

EMITTERS: dict[type[EventData], frozenset[str]] = {
    **dict.fromkeys((datasets.DatasetRegistered, datasets.DatasetValidated,
                     datasets.DatasetRejected), frozenset({"dataset"})),
    **dict.fromkeys((evaluation.EvalCompleted, evaluation.EvalFailed), frozenset({"evaluator"})),
    **dict.fromkeys((governance.ApiKeyCreated, governance.ApiKeyRevoked,
                     governance.AuditCheckpointed, governance.PolicyChanged,
                     governance.PolicyDecided, governance.PromotionApproved,
                     governance.PromotionRejected, governance.ApprovalRefused),
                    frozenset({"governance"})),
    governance.DeadLettered: ANY_SERVICE,  # whichever consumer parked the message
    governance.AuthenticationFailed: ANY_SERVICE,  # whichever service refused the call
    **dict.fromkeys((jobs.JobSubmitted, jobs.JobQueued, jobs.JobAssigned, jobs.JobSucceeded,
                     jobs.JobReleaseRequested, jobs.JobPaused, jobs.JobResumed,
                     jobs.QuotaChanged, jobs.JobRequeued, jobs.JobCancelRequested,
                     jobs.WorkItem, jobs.JobUpdated), frozenset({"scheduler"})),
    **dict.fromkeys((jobs.JobStarted, jobs.JobCheckpointed, jobs.JobCompleted,
                     jobs.JobReleased, jobs.JobMetrics, jobs.WorkerHeartbeat),
                    frozenset({"trainer"})),
    # the scheduler ends jobs no worker runs (cancelled while queued, out of attempts)
    **dict.fromkeys((jobs.JobFailed, jobs.JobCancelled), frozenset({"scheduler", "trainer"})),
    **dict.fromkeys((registry.ModelVersionRegistered, registry.ModelStageChanged,
                     registry.ModelPromotionRequested, registry.ModelAliasMoved,
                     registry.ModelVersionDeleted), frozenset({"registry"})),
    **dict.fromkeys((serving.DeploymentCreated, serving.DeploymentSwitched,
                     serving.DeploymentDeleted), frozenset({"serving"})),
}
_BY_TYPE = {cls.TYPE: services for cls, services in EMITTERS.items()}


def may_emit(service: str, event_type: str) -> bool:
    return service in _BY_TYPE.get(event_type, frozenset())

"""Which service may emit each event type: what a consumer checks beside the signature
(`llmstudio.signing`). Every registered type is listed (a unit test checks it)."""

from __future__ import annotations

from .base import EventData
from .datasets import DatasetRegistered, DatasetRejected, DatasetValidated
from .evaluation import EvalCompleted, EvalFailed
from .governance import ApiKeyCreated, ApiKeyRevoked, AuthenticationFailed, DeadLettered
from .jobs import (
    JobAssigned,
    JobCancelled,
    JobCancelRequested,
    JobCheckpointed,
    JobCompleted,
    JobFailed,
    JobMetrics,
    JobPaused,
    JobQueued,
    JobReleased,
    JobReleaseRequested,
    JobRequeued,
    JobResumed,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobUpdated,
    QuotaChanged,
    WorkerHeartbeat,
    WorkItem,
)
from .registry import ModelStageChanged, ModelVersionRegistered

ANY_SERVICE = frozenset({"dataset", "scheduler", "trainer", "evaluator", "registry", "governance"})

EMITTERS: dict[type[EventData], frozenset[str]] = {
    **dict.fromkeys((DatasetRegistered, DatasetValidated, DatasetRejected),
                    frozenset({"dataset"})),
    **dict.fromkeys((EvalCompleted, EvalFailed), frozenset({"evaluator"})),
    **dict.fromkeys((ApiKeyCreated, ApiKeyRevoked), frozenset({"governance"})),
    DeadLettered: ANY_SERVICE,  # whichever consumer parked the message
    AuthenticationFailed: ANY_SERVICE,  # whichever service refused the call
    **dict.fromkeys((JobSubmitted, JobQueued, JobAssigned, JobSucceeded, JobReleaseRequested,
                     JobPaused, JobResumed, QuotaChanged, JobRequeued, JobCancelRequested,
                     WorkItem, JobUpdated), frozenset({"scheduler"})),
    **dict.fromkeys((JobStarted, JobCheckpointed, JobCompleted, JobReleased, JobMetrics,
                     WorkerHeartbeat), frozenset({"trainer"})),
    # the scheduler ends jobs no worker runs (cancelled while queued, out of attempts)
    **dict.fromkeys((JobFailed, JobCancelled), frozenset({"scheduler", "trainer"})),
    **dict.fromkeys((ModelVersionRegistered, ModelStageChanged), frozenset({"registry"})),
}
_BY_TYPE = {cls.TYPE: services for cls, services in EMITTERS.items()}


def may_emit(service: str, event_type: str) -> bool:
    return service in _BY_TYPE.get(event_type, frozenset())

"""Event contracts: a CloudEvents envelope around one pydantic model per event type."""

from . import datasets, evaluation, governance, jobs, registry, serving  # noqa: F401  (registers)
from .base import EVENT_TYPES, Envelope, EventData, InvalidEvent, decode, make_envelope
from .datasets import DatasetRegistered, DatasetRejected, DatasetValidated
from .emitters import EMITTERS, may_emit
from .evaluation import EvalCompleted, EvalFailed
from .governance import (
    ApiKeyCreated,
    ApiKeyRevoked,
    ApprovalRefused,
    AuditCheckpointed,
    AuthenticationFailed,
    DeadLettered,
    PolicyChanged,
    PolicyDecided,
    PromotionApproved,
    PromotionRejected,
)
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
from .registry import (
    ModelAliasMoved,
    ModelPromotionRequested,
    ModelStageChanged,
    ModelVersionDeleted,
    ModelVersionRegistered,
)
from .serving import DeploymentCreated, DeploymentDeleted, DeploymentSwitched

__all__ = [
    "EMITTERS", "EVENT_TYPES", "Envelope", "EventData", "InvalidEvent", "decode", "make_envelope",
    "may_emit",
    "DatasetRegistered", "DatasetRejected", "DatasetValidated",
    "EvalCompleted", "EvalFailed",
    "ApiKeyCreated", "ApiKeyRevoked", "AuditCheckpointed", "AuthenticationFailed", "DeadLettered",
    "PolicyChanged", "PolicyDecided", "PromotionApproved", "PromotionRejected", "ApprovalRefused",
    "JobAssigned", "JobCancelled", "JobCancelRequested", "JobCheckpointed", "JobCompleted",
    "JobFailed", "JobMetrics", "JobPaused", "JobQueued", "JobReleased", "JobReleaseRequested",
    "JobRequeued", "JobResumed", "JobStarted",
    "JobSubmitted", "JobSucceeded", "JobUpdated", "QuotaChanged", "WorkerHeartbeat", "WorkItem",
    "ModelStageChanged", "ModelVersionRegistered", "ModelPromotionRequested", "ModelAliasMoved",
    "ModelVersionDeleted",
    "DeploymentCreated", "DeploymentDeleted", "DeploymentSwitched",
]

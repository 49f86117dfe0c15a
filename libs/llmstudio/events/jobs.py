"""Job lifecycle events (stream JOBS) and the work item a scheduler sends a worker (stream WORK)."""

from __future__ import annotations

from typing import Any

from .base import EventData, register


@register
class JobSubmitted(EventData):
    TYPE = "llmstudio.job.submitted.v1"
    SUBJECT = "llmstudio.job.submitted"
    ENTITY = "job_id"

    job_id: str
    dataset_id: str
    model_name: str
    spec: dict[str, Any]
    priority: int = 0


@register
class JobQueued(EventData):
    TYPE = "llmstudio.job.queued.v1"
    SUBJECT = "llmstudio.job.queued"
    ENTITY = "job_id"

    job_id: str
    dataset_sha256: str


@register
class JobAssigned(EventData):
    TYPE = "llmstudio.job.assigned.v1"
    SUBJECT = "llmstudio.job.assigned"
    ENTITY = "job_id"

    job_id: str
    worker_id: str
    attempt: int = 1


@register
class JobStarted(EventData):
    TYPE = "llmstudio.job.started.v1"
    SUBJECT = "llmstudio.job.started"
    ENTITY = "job_id"

    job_id: str
    worker_id: str


@register
class JobCheckpointed(EventData):
    TYPE = "llmstudio.job.checkpointed.v1"
    SUBJECT = "llmstudio.job.checkpointed"
    ENTITY = "job_id"

    job_id: str
    step: int
    checkpoint_key: str


@register
class JobCompleted(EventData):
    """Carries everything downstream needs (evaluator, registry) so they need no lookup."""

    TYPE = "llmstudio.job.completed.v1"
    SUBJECT = "llmstudio.job.completed"
    ENTITY = "job_id"

    job_id: str
    worker_id: str
    model_name: str
    spec: dict[str, Any]
    dataset_id: str
    dataset_sha256: str
    dataset_artifacts: dict[str, str]
    checkpoint_key: str
    adapter_key: str
    steps: int
    final_loss: float
    trace_id: str = ""


@register
class JobFailed(EventData):
    TYPE = "llmstudio.job.failed.v1"
    SUBJECT = "llmstudio.job.failed"
    ENTITY = "job_id"

    job_id: str
    reason: str
    worker_id: str = ""


@register
class JobCancelRequested(EventData):
    TYPE = "llmstudio.job.cancel_requested.v1"
    SUBJECT = "llmstudio.job.cancel_requested"
    ENTITY = "job_id"

    job_id: str
    worker_id: str = ""


@register
class JobCancelled(EventData):
    TYPE = "llmstudio.job.cancelled.v1"
    SUBJECT = "llmstudio.job.cancelled"
    ENTITY = "job_id"

    job_id: str
    reason: str = ""


@register
class JobMetrics(EventData):
    """One training metrics sample (stream METRICS, limits retention; not audited)."""

    TYPE = "llmstudio.metrics.training.v1"
    SUBJECT = "llmstudio.metrics"
    ENTITY = "job_id"

    job_id: str
    step: int
    max_steps: int
    loss: float
    learning_rate: float
    tokens_per_s: float = 0.0
    samples_per_s: float = 0.0
    epoch: float = 0.0
    grad_norm: float | None = None
    memory_bytes: float | None = None  # CUDA peak allocated, or the process's resident memory
    eta_s: float | None = None
    eval_loss: float | None = None  # only on steps that ran a periodic evaluation


@register
class WorkItem(EventData):
    """A job placed on one worker: published on llmstudio.work.<worker_id> (stream WORK)."""

    TYPE = "llmstudio.work.train.v1"
    SUBJECT = "llmstudio.work"
    ENTITY = "worker_id"

    worker_id: str
    job_id: str
    model_name: str
    spec: dict[str, Any]
    dataset_id: str
    dataset_sha256: str
    dataset_artifacts: dict[str, str]
    attempt: int = 1


@register
class WorkerHeartbeat(EventData):
    """Core NATS (not stored): a worker's liveness and state, every few seconds."""

    TYPE = "llmstudio.worker.heartbeat.v1"
    SUBJECT = "llmstudio.worker.heartbeat"
    ENTITY = "worker_id"

    worker_id: str
    state: str  # idle | busy
    job_id: str = ""
    device: str = "cpu"  # cpu | cuda
    memory_bytes: int = 0  # what a job may use: free GPU memory, or RAM on a CPU worker
    bf16: bool = False  # the device has native bf16 units

"""Job lifecycle events (stream JOBS) and the work item a scheduler sends a worker (stream WORK).

A job runs in attempts: each placement on a worker is one (`attempt`, from 1). Every report a
worker sends carries the attempt of its work item, and the scheduler applies only reports of the
job's current attempt, so a worker the job was taken back from (lost, partitioned, drained)
changes nothing with its late reports (fencing).
"""

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
    priority: int = 1  # the class's rank: 0 low, 1 normal, 2 high, 3 urgent
    priority_class: str = "normal"


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
    attempt: int = 1
    resumed_from_step: int = 0  # the stored checkpoint this attempt goes on from (0: none)


@register
class JobCheckpointed(EventData):
    TYPE = "llmstudio.job.checkpointed.v1"
    SUBJECT = "llmstudio.job.checkpointed"
    ENTITY = "job_id"

    job_id: str
    step: int
    checkpoint_key: str
    attempt: int = 1


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
    attempt: int = 1


@register
class JobSucceeded(JobCompleted):
    """The scheduler accepted a completion (of the job's current attempt): the one source of
    truth for success. Downstream (evaluator, registry) acts on this, never on a worker's own
    JobCompleted, so a completion the scheduler refused (a stale attempt) registers nothing."""

    TYPE = "llmstudio.job.succeeded.v1"
    SUBJECT = "llmstudio.job.succeeded"


@register
class JobReleased(EventData):
    """A worker handed its job back, checkpointed (shutdown drain): the job is requeued."""

    TYPE = "llmstudio.job.released.v1"
    SUBJECT = "llmstudio.job.released"
    ENTITY = "job_id"

    job_id: str
    worker_id: str
    attempt: int
    step: int
    checkpoint_key: str = ""
    reason: str = ""


@register
class JobReleaseRequested(EventData):
    """The scheduler asks `worker_id` to hand the job's `attempt` back: checkpoint at the next
    step and report JobReleased (preempted by a higher class, or paused)."""

    TYPE = "llmstudio.job.release_requested.v1"
    SUBJECT = "llmstudio.job.release_requested"
    ENTITY = "job_id"

    job_id: str
    worker_id: str
    attempt: int
    reason: str  # "preempted by <job>" | "paused by <key>"


@register
class JobPaused(EventData):
    """The job waits, out of placement, until resumed (its queue place kept)."""

    TYPE = "llmstudio.job.paused.v1"
    SUBJECT = "llmstudio.job.paused"
    ENTITY = "job_id"

    job_id: str
    reason: str = ""


@register
class JobResumed(EventData):
    TYPE = "llmstudio.job.resumed.v1"
    SUBJECT = "llmstudio.job.resumed"
    ENTITY = "job_id"

    job_id: str


@register
class QuotaChanged(EventData):
    """An admin set a tenant's quota and fair-share weight (0: no limit)."""

    TYPE = "llmstudio.job.quota_changed.v1"
    SUBJECT = "llmstudio.job.quota_changed"
    ENTITY = "tenant"

    tenant: str
    max_running: int
    max_queued: int
    max_gpus: int
    max_cpu_slots: int
    weight: float


@register
class JobRequeued(EventData):
    """The scheduler took the job back from `worker_id` (lost, released) and queued it again as
    `attempt`; the worker of an older attempt must stop and upload nothing."""

    TYPE = "llmstudio.job.requeued.v1"
    SUBJECT = "llmstudio.job.requeued"
    ENTITY = "job_id"

    job_id: str
    attempt: int  # the attempt the job will run as next
    worker_id: str = ""  # the worker it was taken from
    reason: str = ""


@register
class JobFailed(EventData):
    TYPE = "llmstudio.job.failed.v1"
    SUBJECT = "llmstudio.job.failed"
    ENTITY = "job_id"

    job_id: str
    reason: str
    worker_id: str = ""
    attempt: int = 1


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
    attempt: int = 1


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
    attempt: int = 1


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
class JobUpdated(EventData):
    """Core NATS (not stored): a scheduler replica tells every replica's WatchJob streams what
    it changed: a status, a metrics sample or a checkpoint of the job."""

    TYPE = "llmstudio.scheduler.job_updated.v1"
    SUBJECT = "llmstudio.scheduler.job_updated"
    ENTITY = "job_id"

    job_id: str
    kind: str  # status | metrics | checkpoint
    job: dict[str, Any]  # the job as the replica saved it
    step: int = 0
    metrics: dict[str, float] = {}
    message: str = ""
    origin: str = ""  # the replica that sent it (it told its own streams already)


@register
class WorkerHeartbeat(EventData):
    """Core NATS (not stored): a worker's liveness and state, every few seconds."""

    TYPE = "llmstudio.worker.heartbeat.v1"
    SUBJECT = "llmstudio.worker.heartbeat"
    ENTITY = "worker_id"

    worker_id: str
    state: str  # idle | busy | draining (shutting down: takes no new work)
    job_id: str = ""
    device: str = "cpu"  # cpu | cuda
    memory_bytes: int = 0  # what a job may use: free GPU memory, or RAM on a CPU worker
    bf16: bool = False  # the device has native bf16 units
    device_count: int = 1  # GPUs (a CPU worker: 1)
    slots: int = 1  # training processes it can run for one job (distributed.num_processes)
    # the last job attempt this worker ended: its outcome may still be on its way (outbox)
    ended_job_id: str = ""
    ended_attempt: int = 0

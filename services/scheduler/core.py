"""The scheduler's domain, pure (no I/O): the job state machine, spec validation, the live-worker
table and placement.

A job moves forward only:

    validating_files -> queued -> running -> succeeded | failed | cancelled

and a terminal state is final, so a late or redelivered event never revives a finished job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from llmstudio.errors import InvalidArgument
from llmstudio.jobspec import JobSpec


def now_iso() -> str:
    """UTC, fixed width, so the strings sort in time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Status(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ACTIVE = frozenset(Status) - TERMINAL


class Happening(StrEnum):
    """What was reported about a job, by the dataset service, a worker or a user."""

    VALIDATED = "validated"
    REJECTED = "rejected"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# happening -> (the statuses it may move a job from, the status it moves it to)
_TRANSITIONS: dict[Happening, tuple[frozenset[Status], Status]] = {
    Happening.VALIDATED: (frozenset({Status.VALIDATING_FILES}), Status.QUEUED),
    Happening.REJECTED: (frozenset({Status.VALIDATING_FILES}), Status.FAILED),
    Happening.STARTED: (frozenset({Status.QUEUED}), Status.RUNNING),
    # A worker's completion may overtake its JobStarted (redelivery after a failed handler).
    Happening.COMPLETED: (frozenset({Status.QUEUED, Status.RUNNING}), Status.SUCCEEDED),
    Happening.FAILED: (ACTIVE, Status.FAILED),
    Happening.CANCELLED: (ACTIVE, Status.CANCELLED),
}


def transition(current: Status, happening: Happening) -> Status | None:
    """The job's next status, or None when `happening` does not apply (stale or duplicate)."""
    sources, target = _TRANSITIONS[happening]
    return target if current in sources else None


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    status: Status
    spec: dict[str, Any]
    model_name: str
    dataset_id: str
    priority: int
    created_by: str
    created_at: str
    updated_at: str
    trace_id: str = ""
    traceparent: str = ""  # the CreateJob call's context: work items are published inside it
    idempotency_key: str | None = None
    dataset_sha256: str = ""
    dataset_artifacts: dict[str, str] = field(default_factory=dict)
    worker_id: str = ""  # set from assignment until the job ends
    assigned_at: str = ""
    attempt: int = 1  # placements so far; a job taken back from a lost worker is placed again
    cancel_requested: bool = False
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    version: int = 1  # optimistic concurrency: an update applies only to the version it read

    @property
    def assigned(self) -> bool:
        return bool(self.worker_id)


def parse_spec(raw: dict[str, Any]) -> JobSpec:
    """Validate a submitted spec; InvalidArgument names every bad field as `spec.<path>`."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = [
            ("spec." + ".".join(str(p) for p in err["loc"]), err["msg"]) for err in e.errors()
        ]
        first_field, first_reason = problems[0]
        rest = "".join(f"; {f}: {r}" for f, r in problems[1:])
        raise InvalidArgument(first_field, first_reason + rest) from None
    for name in ("base_model", "dataset"):
        if not getattr(spec, name).strip():
            raise InvalidArgument(f"spec.{name}", "must not be empty")
    return spec


def names_a_path(base_model: str) -> bool:
    """Whether base_model is written as a filesystem path rather than a hub id ("org/name")."""
    return base_model.startswith(("/", "./", "../", "~")) or base_model in (".", "..")


def metrics_sample(
    *, step: int, max_steps: int, loss: float, learning_rate: float, tokens_per_s: float,
    samples_per_s: float, epoch: float,
) -> dict[str, float]:
    return {
        "step": float(step), "max_steps": float(max_steps), "loss": loss,
        "learning_rate": learning_rate, "tokens_per_s": tokens_per_s,
        "samples_per_s": samples_per_s, "epoch": epoch,
    }


def latest_metrics(current: dict[str, float], sample: dict[str, float]) -> dict[str, float]:
    """The newest sample over the current one (keys it lacks, like final_loss, stay); an older
    sample (a redelivery) changes nothing."""
    return {**current, **sample} if sample["step"] >= current.get("step", -1.0) else current


# -- workers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    worker_id: str
    state: str  # idle | busy
    job_id: str
    device: str
    seen_at: float


class WorkerTable:
    """Workers by their last heartbeat. Live = heard from within `ttl_s`.

    A worker never heard from counts as seen when the table was made, so after a scheduler
    restart the workers of running jobs get one full TTL to show up before they are lost.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._since = clock()
        self._workers: dict[str, Worker] = {}

    def heartbeat(self, worker_id: str, state: str, job_id: str = "", device: str = "") -> None:
        self._workers[worker_id] = Worker(worker_id, state, job_id, device, self._clock())

    def silent_for(self, worker_id: str) -> float:
        w = self._workers.get(worker_id)
        return self._clock() - (w.seen_at if w else self._since)

    def is_lost(self, worker_id: str) -> bool:
        return self.silent_for(worker_id) > self.ttl_s

    def live(self) -> list[Worker]:
        """Live workers; forgets the dead ones, so the table stays as small as the fleet."""
        for wid in [wid for wid in self._workers if self.is_lost(wid)]:
            del self._workers[wid]
        return sorted(self._workers.values(), key=lambda w: w.worker_id)


def place(
    queued: Iterable[Job], workers: Iterable[Worker], holding: set[str]
) -> list[tuple[str, str]]:
    """Pair waiting jobs (priority desc, then oldest first) with idle workers holding nothing.

    `queued` are queued, unassigned jobs; `holding` the workers that already have an assignment
    (their heartbeat may still say idle until they pick the work item up).
    """
    free = sorted(w.worker_id for w in workers if w.state == "idle" and w.worker_id not in holding)
    order = sorted(queued, key=lambda j: (-j.priority, j.created_at, j.id))
    return [(job.id, worker) for job, worker in zip(order, free, strict=False)]


def lost_assignments(
    assigned: Sequence[Job], workers: WorkerTable
) -> tuple[list[Job], list[Job]]:
    """Jobs whose worker went silent: (not yet started: place again, running: fail)."""
    lost = [j for j in assigned if j.assigned and workers.is_lost(j.worker_id)]
    return (
        [j for j in lost if j.status == Status.QUEUED],
        [j for j in lost if j.status == Status.RUNNING],
    )

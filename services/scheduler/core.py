"""The scheduler's domain, pure (no I/O): the job state machine, spec validation, the live-worker
table and placement.

A job moves forward, except that a running job can go back to the queue:

    validating_files -> queued -> running -> succeeded | failed | cancelled
                        ^ |  ^          |
                        | |  +----------+  requeued: its worker was lost, or handed it back
                        | v                (drained, preempted)
                       paused              (a pause of a running job: once it is handed back)

and a terminal state is final, so a late or redelivered event never revives a finished job.
Each placement on a worker is an attempt (`Job.attempt`, `Job.attempts` its history); a worker's
report applies only to the current attempt (`reported`), which fences off a worker the job was
taken back from.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from pydantic import ValidationError

from llmstudio.errors import InvalidArgument, PermissionDenied
from llmstudio.jobspec import JobSpec
from llmstudio.ml.memory import format_bytes


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
    PAUSED = "paused"  # out of placement until resumed; keeps its place in the queue

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
    REQUEUED = "requeued"  # the worker was lost, or handed the job back (drain)
    PAUSED = "paused"  # a user paused it (a running one: once its worker handed it back)
    RESUMED = "resumed"


# happening -> (the statuses it may move a job from, the status it moves it to)
_TRANSITIONS: dict[Happening, tuple[frozenset[Status], Status]] = {
    Happening.VALIDATED: (frozenset({Status.VALIDATING_FILES}), Status.QUEUED),
    Happening.REJECTED: (frozenset({Status.VALIDATING_FILES}), Status.FAILED),
    Happening.STARTED: (frozenset({Status.QUEUED}), Status.RUNNING),
    # A worker's completion may overtake its JobStarted (redelivery after a failed handler).
    Happening.COMPLETED: (frozenset({Status.QUEUED, Status.RUNNING}), Status.SUCCEEDED),
    Happening.FAILED: (ACTIVE, Status.FAILED),
    Happening.CANCELLED: (ACTIVE, Status.CANCELLED),
    Happening.REQUEUED: (frozenset({Status.QUEUED, Status.RUNNING}), Status.QUEUED),
    Happening.PAUSED: (frozenset({Status.QUEUED, Status.RUNNING}), Status.PAUSED),
    Happening.RESUMED: (frozenset({Status.PAUSED}), Status.QUEUED),
}


def transition(current: Status, happening: Happening) -> Status | None:
    """The job's next status, or None when `happening` does not apply (stale or duplicate)."""
    sources, target = _TRANSITIONS[happening]
    return target if current in sources else None


@dataclass(frozen=True)
class Attempt:
    """One placement of a job on a worker, as `jobs show` lists it."""

    attempt: int
    worker_id: str
    assigned_at: str
    started_at: str = ""
    ended_at: str = ""
    reason: str = ""  # how it ended: completed, failed: ..., worker lost, released: ...
    resumed_from_step: int = 0  # the stored checkpoint it went on from (0: from the start)
    lost: bool = False  # ended by its worker going silent: counts toward max_attempts


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
    pause_requested: bool = False  # paused while on a worker: paused once it is handed back
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    # bytes per process (llmstudio.ml.memory: weights, gradients, optimizer, activations,
    # total); {} when the base model's config was not readable at submit
    memory_estimate: dict[str, float] = field(default_factory=dict)
    attempts: tuple[Attempt, ...] = ()  # every placement, oldest first
    version: int = 1  # optimistic concurrency: an update applies only to the version it read

    @property
    def assigned(self) -> bool:
        return bool(self.worker_id)

    @property
    def max_attempts(self) -> int:
        return int(self.spec.get("max_attempts", 3))

    @property
    def lost_attempts(self) -> int:
        return sum(a.lost for a in self.attempts)

    def current_attempt(self) -> Attempt | None:
        last = self.attempts[-1] if self.attempts else None
        return last if last is not None and last.attempt == self.attempt else None

    def with_current_attempt(self, **changes: Any) -> Job:
        """The job with its current attempt's record changed (no record: unchanged)."""
        current = self.current_attempt()
        if current is None:
            return self
        return dataclasses.replace(
            self, attempts=(*self.attempts[:-1], dataclasses.replace(current, **changes)))


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job as JSON-ready data (status as its value, attempts as dicts)."""
    out = dataclasses.asdict(job)
    out["status"] = job.status.value
    return out


def job_from_dict(raw: dict[str, Any]) -> Job:
    values = dict(raw)
    values["status"] = Status(values["status"])
    values["attempts"] = tuple(Attempt(**a) for a in values.get("attempts", ()))
    return Job(**values)


@dataclass(frozen=True)
class Report:
    """What a worker reported about its job: the happening and what it adds to the job."""

    happening: Happening
    worker_id: str = ""  # "" when the report does not say (a cancellation)
    reason: str = ""  # why it failed or was cancelled
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    attempt: int = 1  # the attempt of the work item the worker ran
    resumed_from_step: int = 0  # a start: the stored checkpoint it goes on from

    def from_another_worker(self, job: Job) -> bool:
        """Sent by a worker that does not hold the job (one it was taken back from)."""
        return bool(self.worker_id and job.worker_id and self.worker_id != job.worker_id)

    def stale(self, job: Job) -> bool:
        """About an attempt that is not the job's current one, or from another worker."""
        return self.attempt != job.attempt or self.from_another_worker(job)


def reported(job: Job, report: Report, now: str) -> Job | None:
    """The job as `report` leaves it, or None when the report does not apply: stale (another
    attempt, another worker), or a duplicate. A worker's release is `requeued`, not this."""
    status = transition(job.status, report.happening)
    if status is None or report.stale(job):
        return None
    job = dataclasses.replace(
        job, status=status, worker_id=report.worker_id or job.worker_id,
        artifacts={**job.artifacts, **report.artifacts}, metrics={**job.metrics, **report.metrics},
        error=report.reason if report.happening == Happening.FAILED else job.error,
    )
    if report.happening == Happening.STARTED:
        return job.with_current_attempt(started_at=now,
                                        resumed_from_step=report.resumed_from_step)
    return job.with_current_attempt(ended_at=now, reason=_ended_because(report))


def _ended_because(report: Report) -> str:
    if report.happening == Happening.COMPLETED:
        return "completed"
    return f"{report.happening.value}: {report.reason}" if report.reason else report.happening


def assigned(job: Job, worker_id: str, now: str) -> Job:
    """`job` placed on `worker_id` as its current attempt."""
    return dataclasses.replace(
        job, worker_id=worker_id, assigned_at=now,
        attempts=(*job.attempts, Attempt(job.attempt, worker_id, now)),
    )


def requeued(job: Job, reason: str, now: str, *, lost: bool) -> Job | None:
    """`job` taken back from its worker and queued again as the next attempt, or None when the
    job cannot go back (finished). `lost`: the worker went silent (counts toward
    max_attempts; `exhausted` says when the job must fail instead)."""
    status = transition(job.status,
                        Happening.PAUSED if job.pause_requested else Happening.REQUEUED)
    if status is None:
        return None
    ended = job.with_current_attempt(ended_at=now, reason=reason, lost=lost)
    return dataclasses.replace(ended, status=status, worker_id="", assigned_at="",
                               attempt=job.attempt + 1, pause_requested=False)


def exhausted(job: Job) -> bool:
    """Whether one more lost attempt would exceed the job's max_attempts."""
    return job.lost_attempts + 1 >= job.max_attempts


def attempts_summary(job: Job) -> str:
    """`attempt 1 on w1: worker lost; attempt 2 on w2: ...`: the history a failure carries."""
    return "; ".join(f"attempt {a.attempt} on {a.worker_id}: {a.reason or 'running'}"
                     for a in job.attempts)


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
    samples_per_s: float, epoch: float, **optional: float | None,
) -> dict[str, float]:
    """A sample as stored and streamed; optional metrics (grad_norm, eval_loss, ...) only when
    the trainer reported them."""
    return {
        "step": float(step), "max_steps": float(max_steps), "loss": loss,
        "learning_rate": learning_rate, "tokens_per_s": tokens_per_s,
        "samples_per_s": samples_per_s, "epoch": epoch,
        **{k: float(v) for k, v in optional.items() if v is not None},
    }


def latest_metrics(current: dict[str, float], sample: dict[str, float]) -> dict[str, float]:
    """The newest sample over the current one (keys it lacks, like final_loss, stay); an older
    sample (a redelivery) changes nothing."""
    return {**current, **sample} if sample["step"] >= current.get("step", -1.0) else current


# -- priority -------------------------------------------------------------------------------


class PriorityClass(IntEnum):
    """A job's priority class (stored as its rank in `Job.priority`): higher runs first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    URGENT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


# The highest class each role may ask for: urgent is the admins' (it may preempt others' work).
ROLE_CEILING = {"admin": PriorityClass.URGENT, "developer": PriorityClass.HIGH}


def priority_class(name: str, roles: Iterable[str]) -> PriorityClass:
    """The class a caller with `roles` asked for ('' = normal); InvalidArgument for an unknown
    name, PermissionDenied above the caller's ceiling."""
    try:
        wanted = PriorityClass[(name or "normal").upper()]
    except KeyError:
        raise InvalidArgument("priority_class", f"{name!r} is not one of "
                              + ", ".join(c.label for c in PriorityClass)) from None
    ceiling = max((ROLE_CEILING.get(r, PriorityClass.LOW) for r in roles),
                  default=PriorityClass.LOW)
    if wanted > ceiling:
        raise PermissionDenied(f"priority class {wanted.label} needs a role allowed it "
                               f"(yours allow up to {ceiling.label}; urgent is for admins)")
    return wanted


def effective_priority(job: Job, now: datetime, aging_s: float) -> float:
    """The class rank plus one per `aging_s` waited since submission, so a waiting job is not
    starved by a stream of newer, higher ones; aging never lifts a job to urgent."""
    if job.priority >= PriorityClass.URGENT or aging_s <= 0:
        return float(job.priority)
    waited = (now - _parse_time(job.created_at)).total_seconds()
    return min(job.priority + max(waited, 0.0) / aging_s, float(PriorityClass.HIGH))


@functools.lru_cache(maxsize=65536)  # every waiting job's, every placement round
def _parse_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# -- quotas and fair share -------------------------------------------------------------------

# The tenant whose admins set every tenant's quota (the bootstrap admin's); other admins set
# their own tenant's only.
PLATFORM_TENANT = "default"


@dataclass(frozen=True)
class Quota:
    """A tenant's limits (0: none) and its weight in the fair share of free capacity."""

    tenant: str
    max_running: int = 0  # jobs on workers at once
    max_queued: int = 0  # jobs waiting (validating, queued, paused): more are refused at submit
    max_gpus: int = 0  # GPUs its running jobs hold (a job holds num_processes on a GPU worker)
    max_cpu_slots: int = 0  # CPU worker slots its running jobs hold (num_processes each)
    weight: float = 1.0
    updated_by: str = ""
    updated_at: str = ""

    def __post_init__(self) -> None:
        for name in ("max_running", "max_queued", "max_gpus", "max_cpu_slots"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"quota.{name}", "must be >= 0 (0: no limit)")
        if not self.weight > 0:
            raise InvalidArgument("quota.weight", "must be > 0")


def processes(job: Job) -> int:
    return int(job.spec.get("distributed", {}).get("num_processes", 1))


@dataclass
class Usage:
    """What each tenant's jobs on workers hold: jobs, GPUs, CPU slots."""

    running: dict[str, int] = field(default_factory=dict)
    gpus: dict[str, int] = field(default_factory=dict)
    cpu_slots: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, held: Iterable[Job], workers: WorkerTable) -> Usage:
        usage = cls()
        for job in held:
            w = workers.get(job.worker_id)
            usage.add(job, w.gpu if w else False)
        return usage

    def copy(self) -> Usage:
        return Usage(dict(self.running), dict(self.gpus), dict(self.cpu_slots))

    def add(self, job: Job, on_gpu: bool) -> None:
        t = job.tenant
        self.running[t] = self.running.get(t, 0) + 1
        held = self.gpus if on_gpu else self.cpu_slots
        held[t] = held.get(t, 0) + processes(job)

    def dominant_share(self, tenant: str, capacity: tuple[int, int], weight: float) -> float:
        """Dominant resource fairness (Ghodsi et al., NSDI 2011): the larger of the tenant's
        shares of the fleet's GPUs and CPU slots, divided by its weight."""
        gpus, cpu_slots = capacity
        shares = [self.gpus.get(tenant, 0) / gpus if gpus else 0.0,
                  self.cpu_slots.get(tenant, 0) / cpu_slots if cpu_slots else 0.0]
        return max(shares) / weight


def quota_access_refusal(caller_tenant: str, tenant: str) -> str:
    """Why a caller of `caller_tenant` may not see or set `tenant`'s quota ('' if it may): only
    the platform tenant's callers reach other tenants."""
    if tenant == caller_tenant or caller_tenant == PLATFORM_TENANT:
        return ""
    return f"tenant {caller_tenant!r} reaches only its own quota, not {tenant!r}'s"


def quota_reason(job: Job, quota: Quota | None, usage: Usage, on_gpu: bool | None = None) -> str:
    """Why the tenant's quota holds `job` back now ('' if it does not): `quota running 2/2`.
    `on_gpu`: the kind of worker it would take (None: check the running limit only)."""
    if quota is None:
        return ""
    t = job.tenant
    if quota.max_running and usage.running.get(t, 0) >= quota.max_running:
        return f"quota running {usage.running.get(t, 0)}/{quota.max_running}"
    if on_gpu is True and quota.max_gpus and \
            usage.gpus.get(t, 0) + processes(job) > quota.max_gpus:
        return f"quota gpus {usage.gpus.get(t, 0)}+{processes(job)}/{quota.max_gpus}"
    if on_gpu is False and quota.max_cpu_slots and \
            usage.cpu_slots.get(t, 0) + processes(job) > quota.max_cpu_slots:
        return (f"quota cpu slots {usage.cpu_slots.get(t, 0)}+{processes(job)}/"
                f"{quota.max_cpu_slots}")
    return ""


def queued_quota_refusal(quota: Quota | None, waiting: int) -> str:
    """Why a new job is refused at submit ('' to accept): the tenant's waiting jobs are at its
    queued quota."""
    if quota is None or not quota.max_queued or waiting < quota.max_queued:
        return ""
    return f"quota queued {waiting}/{quota.max_queued}: the tenant's waiting jobs are at its limit"


# -- workers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    worker_id: str
    state: str  # idle | busy
    job_id: str
    device: str
    seen_at: float
    memory_bytes: int = 0  # what a job may use there (free GPU memory / available RAM); 0: unknown
    bf16: bool = False  # native bf16 units
    ended: tuple[str, int] = ("", 0)  # (job id, attempt) it ended last; its report may be coming
    device_count: int = 1  # GPUs (a CPU worker: 1)
    slots: int = 1  # training processes it can run for one job (distributed.num_processes)

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        """`w1 (cuda, 20.0 GiB free)`: for refusal messages."""
        mem = f", {format_bytes(self.memory_bytes)} free" if self.memory_bytes else ""
        return f"{self.worker_id} ({self.device or 'cpu'}{mem})"


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

    def heartbeat(
        self, worker_id: str, state: str, job_id: str = "", device: str = "",
        memory_bytes: int = 0, bf16: bool = False, ended: tuple[str, int] = ("", 0),
        device_count: int = 1, slots: int = 1,
    ) -> bool:
        """Record a heartbeat; True when the worker has just become idle (or is new)."""
        before = self._workers.get(worker_id)
        self._workers[worker_id] = Worker(
            worker_id, state, job_id, device, self._clock(), memory_bytes, bf16, ended,
            max(device_count, 1), max(slots, 1))
        return state == "idle" and (before is None or before.state != "idle")

    def silent_for(self, worker_id: str) -> float:
        w = self._workers.get(worker_id)
        return self._clock() - (w.seen_at if w else self._since)

    def is_lost(self, worker_id: str) -> bool:
        return self.silent_for(worker_id) > self.ttl_s

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def now(self) -> float:
        return self._clock()

    def forgive_silence(self) -> None:
        """Count every worker as heard from now: after the scheduler's own broker connection was
        down, the heartbeats it missed say nothing about the workers."""
        now = self._clock()
        self._since = now
        for wid, w in self._workers.items():
            self._workers[wid] = dataclasses.replace(w, seen_at=now)

    def live(self) -> list[Worker]:
        """Live workers; forgets the dead ones, so the table stays as small as the fleet."""
        for wid in [wid for wid in self._workers if self.is_lost(wid)]:
            del self._workers[wid]
        return sorted(self._workers.values(), key=lambda w: w.worker_id)


def needs_gpu(spec: dict[str, Any]) -> str:
    """Why a stored spec cannot run on a CPU worker ('' if it can, or if it does not parse)."""
    try:
        return JobSpec.model_validate(spec).needs_gpu()
    except ValidationError:
        return ""


def cannot_run(job: Job, worker: Worker, gpu_reason: str | None = None) -> str:
    """Why `worker` cannot run `job` ('' if it can): the device it needs, bf16 units, memory.
    `gpu_reason`: `needs_gpu(job.spec)` when the caller has it already."""
    why = needs_gpu(job.spec) if gpu_reason is None else gpu_reason
    if why and not worker.gpu:
        return why
    if processes(job) > worker.slots:
        return (f"needs {processes(job)} processes (distributed.num_processes), worker has "
                f"{worker.slots} slot(s)")
    if job.spec.get("precision") == "bf16" and not (worker.gpu or worker.bf16):
        return "precision bf16 needs a CUDA GPU or a CPU with bf16 units"
    need = job.memory_estimate.get("total", 0.0)
    if worker.memory_bytes and need > worker.memory_bytes:
        return (f"needs ~{format_bytes(need)} per process, worker has "
                f"{format_bytes(worker.memory_bytes)} free")
    return ""


def refuse_on(spec: JobSpec, workers: Sequence[Worker]) -> str:
    """Why to refuse a spec at submit ('' to accept): no live worker could ever run it (it needs
    a GPU and they are all CPUs, or more processes than any has slots). With no live worker it
    is accepted and waits for a capable one."""
    if not workers:
        return ""
    why = spec.needs_gpu()
    if why and not any(w.gpu for w in workers):
        return f"{why}; live workers: " + ", ".join(w.describe() for w in workers)
    n = spec.distributed.num_processes
    if not any(w.slots >= n for w in workers if w.gpu or not why):
        return (f"distributed.num_processes {n} needs a worker with {n} slots; live workers: "
                + ", ".join(f"{w.worker_id} ({w.slots} slot(s))" for w in workers))
    return ""


def placement_order(queued: Iterable[Job], now: datetime | None = None,
                    aging_s: float = 0.0) -> list[Job]:
    """Effective priority (class and aging) first, then oldest first."""
    at = now or datetime.now(UTC)
    return sorted(queued, key=lambda j: (-effective_priority(j, at, aging_s), j.created_at, j.id))


def place(
    queued: Iterable[Job], workers: Iterable[Worker], holding: set[str],
    now: datetime | None = None, aging_s: float = 0.0,
    quotas: Mapping[str, Quota] | None = None, usage: Usage | None = None,
) -> list[tuple[str, str]]:
    """Pair waiting jobs with idle workers holding nothing, each job with the first free worker
    that can run it (`cannot_run`) within its tenant's quota (`quota_reason`).

    Order: effective priority (class and aging) first; among equals, the tenant with the
    smallest weighted dominant share of the fleet (`Usage.dominant_share`, DRF) goes first, so
    free capacity is shared between tenants in proportion to their weights; then oldest first.
    A job no free worker can run waits, and the workers stay free for the jobs behind it; a
    tenant at its running quota places nothing more this round.

    `queued` are queued, unassigned jobs; `holding` the workers that already have an assignment
    (their heartbeat may still say idle until they pick the work item up); `usage` what the
    tenants' jobs on workers hold now.
    """
    live = list(workers)
    free = free_workers(live, holding)
    quotas = quotas or {}
    usage = usage.copy() if usage else Usage()
    capacity = fleet_capacity(live)
    at = now or datetime.now(UTC)
    heads: dict[str, list[tuple[float, Job]]] = {}  # per tenant, in placement order, reversed
    for job in reversed(placement_order(queued, at, aging_s)):
        heads.setdefault(job.tenant, []).append((effective_priority(job, at, aging_s), job))

    def turn(tenant: str) -> tuple:
        eff, job = heads[tenant][-1]
        weight = quotas[tenant].weight if tenant in quotas else 1.0
        return (-eff, usage.dominant_share(tenant, capacity, weight), job.created_at, job.id)

    pairs = []
    while free and heads:
        tenant = min(heads, key=turn)
        _, job = heads[tenant].pop()
        if not heads[tenant]:
            del heads[tenant]
        quota = quotas.get(tenant)
        if quota_reason(job, quota, usage):
            heads.pop(tenant, None)  # at its running quota: none of its jobs goes now
            continue
        gpu_reason = needs_gpu(job.spec)
        worker = next((w for w in free if not cannot_run(job, w, gpu_reason)
                       and not quota_reason(job, quota, usage, w.gpu)), None)
        if worker is not None:
            free.remove(worker)
            pairs.append((job.id, worker.worker_id))
            usage.add(job, worker.gpu)
    return pairs


def free_workers(workers: Iterable[Worker], holding: set[str]) -> list[Worker]:
    """Idle workers with no assignment yet (`holding`: the workers jobs are assigned to; their
    heartbeat may say idle until they pick the work item up), by id."""
    return sorted((w for w in workers if w.state == "idle" and w.worker_id not in holding),
                  key=lambda w: w.worker_id)


def fleet_capacity(workers: Iterable[Worker]) -> tuple[int, int]:
    """(GPUs, CPU worker slots) of the live fleet: the denominators of the fair share."""
    workers = list(workers)
    return (sum(w.device_count for w in workers if w.gpu),
            sum(w.slots for w in workers if not w.gpu))


def why_waiting(job: Job, queued: Sequence[Job], workers: Sequence[Worker],
                quota: Quota | None, usage: Usage, now: datetime | None = None,
                aging_s: float = 0.0) -> str:
    """Why a queued job is not on a worker yet, for `jobs show`: its tenant's quota, no live
    worker able to run it, or the jobs placed before it."""
    if job.status == Status.PAUSED:
        return "paused: resume it to queue it again"
    if job.status != Status.QUEUED or job.assigned:
        return ""
    if reason := quota_reason(job, quota, usage):
        return reason
    if not workers:
        return "no live worker"
    gpu_reason = needs_gpu(job.spec)
    unable = [f"{w.worker_id}: {why}" for w in workers
              if (why := cannot_run(job, w, gpu_reason))]
    if len(unable) == len(workers):
        return "no worker can run it (" + "; ".join(unable) + ")"
    order = placement_order(queued, now, aging_s)
    ahead = order[:next((i for i, j in enumerate(order) if j.id == job.id), len(order))]
    if not ahead:
        return "next: waiting for a free worker"
    top = PriorityClass(max(j.priority for j in ahead)).label
    same = sum(1 for j in ahead if PriorityClass(j.priority).label == top)
    return f"behind {len(ahead)} job(s), {same} of class {top}"


def lost_assignments(assigned: Sequence[Job], workers: WorkerTable) -> list[Job]:
    """Jobs whose worker went silent past the TTL: its lease on them expired."""
    return [j for j in assigned if j.assigned and workers.is_lost(j.worker_id)]


def disowned(running: Sequence[Job], workers: WorkerTable, running_since: dict[str, float],
             settle_s: float) -> list[Job]:
    """Running jobs whose worker, alive, says it runs something else (idle, or another job) in
    a heartbeat sent more than `settle_s` after the scheduler saw the job running there (an
    earlier one may predate the start), and has not ended the job's attempt (then its outcome
    is on its way). `running_since`: job id -> that moment (the WorkerTable's clock)."""
    out = []
    for job in running:
        worker = workers.get(job.worker_id)
        since = running_since.get(job.id)
        if worker is None or since is None or worker.seen_at <= since + settle_s:
            continue
        runs_it = worker.state == "busy" and worker.job_id == job.id
        if not runs_it and worker.ended != (job.id, job.attempt):
            out.append(job)
    return out


def preemptions(
    waiting: Sequence[Job], running: Sequence[Job], workers: WorkerTable, preempting: set[str],
) -> list[tuple[Job, Job]]:
    """(running job to preempt, the waiting job it makes room for): for each waiting job no free
    worker could take (in placement order), the running job of the lowest class below the
    waiting job's own class whose worker could run it (newest first among equals); never one of
    the same class, and never one already being preempted (`preempting`: their ids)."""
    taken = set(preempting)
    lowest = min((r.priority for r in running), default=None)
    pairs = []
    for job in waiting:
        if lowest is None or job.priority <= lowest:
            continue  # nothing runs below its class
        gpu_reason = needs_gpu(job.spec)
        victims = [
            r for r in running
            if r.priority < job.priority and r.id not in taken
            and (w := workers.get(r.worker_id)) is not None
            # what memory it reports free now is what the victim leaves: no bound once it is gone
            and not cannot_run(job, dataclasses.replace(w, memory_bytes=0), gpu_reason)
        ]
        if victims:
            victim = min(victims, key=lambda r: (r.priority, _negated(r.assigned_at)))
            taken.add(victim.id)
            pairs.append((victim, job))
    return pairs


def _negated(stamp: str) -> tuple[int, ...]:
    """Sorts ISO stamps newest first."""
    return tuple(-ord(c) for c in stamp)


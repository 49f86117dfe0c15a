"""The evaluator's domain: an evaluation record, its inputs, and its report. Pure, no I/O.

Two triggers: a job the scheduler accepted (ON_JOB_COMPLETED: its validation split, the
default suite, announced by EvalCompleted/EvalFailed, which the registry attaches to the job's
version), and a user's request (CreateEvaluation: a registry version or a base model, any
dataset version and split, a suite and task files; not announced on the bus, so the version's
own evaluation in the registry stays the one its job made). Both report every metric of base and
tuned with the paired bootstrap interval of their difference (llmstudio.ml.bootstrap)."""

from __future__ import annotations

import hashlib
import math
import sys
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from llmstudio.artifactkeys import check_tenant_key, tenant_key
from llmstudio.errors import FailedPrecondition, InvalidArgument
from llmstudio.events import EvalCompleted, EvalFailed, EventData, JobCompleted
from llmstudio.jobspec import JobSpec, format_validation_error
from llmstudio.ml.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, compare
from llmstudio.ml.metrics import result_stats, scores, suite_metrics
from llmstudio.ml.tasks import NAME as TASK_NAME
from llmstudio.ml.tasks import SCORINGS

RUNNING, COMPLETED, FAILED = "running", "completed", "failed"
# What started an evaluation; one evaluation per (job, trigger).
ON_JOB_COMPLETED = "job.completed"
REQUESTED = "request"  # CreateEvaluation: trigger "request:<id or idempotency hash>"
VALIDATION_SPLIT = "validation"
SPLITS = ("train", "validation", "test")
HEADLINE = ("eval_loss", "perplexity", "exact_match")


@dataclass
class Evaluation:
    id: str
    job_id: str
    tenant: str
    job: dict[str, Any]  # the JobCompleted payload: everything needed to (re)run it
    actor: str = ""
    traceparent: str = ""  # the job's trace, so a resumed evaluation still reports in it
    trigger: str = ON_JOB_COMPLETED
    status: str = RUNNING
    base_metrics: dict[str, float] = field(default_factory=dict)
    tuned_metrics: dict[str, float] = field(default_factory=dict)
    report_key: str = ""
    error: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # CreateEvaluation: what was asked, resolved (keys of the tenant's records); {} for a job's
    request: dict[str, Any] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def requested(self) -> bool:
        return self.trigger.startswith(REQUESTED + ":")


def new_evaluation_id() -> str:
    return f"ev-{uuid.uuid4().hex[:12]}"


def evaluation_for_job(job: JobCompleted, *, tenant: str, actor: str,
                       traceparent: str) -> Evaluation:
    return Evaluation(
        id=new_evaluation_id(),
        job_id=job.job_id,
        tenant=tenant,
        actor=actor,
        job=job.model_dump(mode="json"),
        traceparent=traceparent,
    )


def completed(ev: Evaluation, base: dict[str, float], tuned: dict[str, float],
              report_key: str, comparisons: list[dict[str, Any]] | None = None) -> Evaluation:
    return replace(ev, status=COMPLETED, base_metrics=base, tuned_metrics=tuned,
                   report_key=report_key, error="", comparisons=list(comparisons or []))


def failed(ev: Evaluation, error: Exception) -> Evaluation:
    # bounded: the reason travels in an event and a database column
    return replace(ev, status=FAILED, error=f"{type(error).__name__}: {error}"[:2000])


def _completed_event(ev: Evaluation) -> EventData:
    return EvalCompleted(
        evaluation_id=ev.id, job_id=ev.job_id, model_name=ev.job.get("model_name", ""),
        base_metrics=ev.base_metrics, tuned_metrics=ev.tuned_metrics, report_key=ev.report_key,
    )


def _failed_event(ev: Evaluation) -> EventData:
    return EvalFailed(evaluation_id=ev.id, job_id=ev.job_id, reason=ev.error)


OUTCOME_EVENTS = {COMPLETED: _completed_event, FAILED: _failed_event}


def outcome_event(ev: Evaluation) -> EventData:
    """The event that announces a finished evaluation: EvalCompleted or EvalFailed."""
    return OUTCOME_EVENTS[ev.status](ev)


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate, read from the job: base model, splits, limits."""

    base_model: str
    validation_key: str  # the split evaluated (a job's validation split, or the one requested)
    checkpoint_key: str  # "" : the base model alone
    max_samples: int
    max_new_tokens: int
    max_seq_length: int
    metrics: tuple[str, ...] = ("eval_loss", "perplexity", "exact_match")
    tasks: tuple[dict[str, str], ...] = ()  # {"name", "scoring", and "key" or "path"}
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED


def plan(job: JobCompleted, tenant: str) -> EvalPlan:
    """What to evaluate for `tenant`'s completed job; its keys must lie in that tenant's prefix."""
    try:
        spec = JobSpec.model_validate(job.spec)
    except ValidationError as e:
        raise ValueError(
            f"job {job.job_id} has an invalid spec: {format_validation_error(e)}") from None
    key = job.dataset_artifacts.get(VALIDATION_SPLIT)
    if not key:
        raise ValueError(
            f"dataset {job.dataset_id} has no '{VALIDATION_SPLIT}' split "
            f"(splits: {sorted(job.dataset_artifacts) or 'none'})"
        )
    if not job.checkpoint_key:
        raise ValueError(f"job {job.job_id} names no checkpoint_key")
    return EvalPlan(
        base_model=spec.base_model,
        validation_key=check_tenant_key(key, tenant, "the validation split"),
        checkpoint_key=check_tenant_key(job.checkpoint_key, tenant, "the checkpoint"),
        max_samples=spec.eval.max_samples,
        max_new_tokens=spec.eval.max_new_tokens,
        # evaluate the tokens training saw: same truncation as the recipe
        max_seq_length=spec.hyperparameters.max_seq_length,
    )


def headline(result: dict[str, Any], which: str) -> dict[str, float]:
    """eval_loss, perplexity, exact_match of an `evaluate_model` result, as finite floats.

    A non-finite loss means nothing was measured (no learned token): that is an error, not a
    number to compare. Perplexity overflows to inf above loss ~709: clamped to the largest
    float so the metrics stay valid JSON.
    """
    loss = float(result["eval_loss"])
    if not math.isfinite(loss):
        raise ValueError(f"{which} model: eval_loss is {loss} (no completion tokens to score?)")
    metrics = {
        "eval_loss": loss,
        "perplexity": min(float(result["perplexity"]), sys.float_info.max),
    }
    # Text rows (continued pre-training) have no reference answer: exact match is not measured.
    if result.get("exact_match") is not None:
        metrics["exact_match"] = float(result["exact_match"])
    return metrics


def report_key(tenant: str, evaluation_id: str) -> str:
    return tenant_key(tenant, "evaluations", evaluation_id, "report.json")


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def build_report(
    ev: Evaluation, p: EvalPlan, base: dict[str, Any], tuned: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON report: both metric sets, their paired comparisons, and example generations.

    A job's evaluation keeps its headline metrics (eval_loss, perplexity, exact_match); a
    requested one reports every metric of its suite and task files. `tuned` None: the base model
    alone (no comparison)."""
    base_stats = result_stats(p.metrics, base)
    if ev.requested:
        base_m = _finite(scores(base_stats))
    else:
        base_m = headline(base, "base")
    report: dict[str, Any] = {
        "evaluation_id": ev.id,
        "job_id": ev.job_id,
        "model_name": ev.request.get("model_name", "") or ev.job.get("model_name", ""),
        "version": ev.request.get("version", 0),
        "base_model": p.base_model,
        "checkpoint_key": p.checkpoint_key,
        "validation_key": p.validation_key,
        "dataset_id": ev.request.get("dataset_id", "") or ev.job.get("dataset_id", ""),
        "split": ev.request.get("split", VALIDATION_SPLIT),
        "suite": ev.request.get("suite", "default"),
        "samples": base["samples"],
        "base": {"metrics": base_m, "examples": base["examples"]},
        "comparisons": [],
    }
    if tuned is None:
        report["tuned"] = {"metrics": {}, "examples": []}
        return report
    tuned_stats = result_stats(p.metrics, tuned)
    tuned_m = _finite(scores(tuned_stats)) if ev.requested else headline(tuned, "tuned")
    comparisons = compare(base_stats, tuned_stats, resamples=p.resamples, seed=p.seed)
    report["tuned"] = {"metrics": tuned_m, "examples": tuned["examples"]}
    report["comparisons"] = [c.as_dict() for c in comparisons if c.name in base_m
                             and c.name in tuned_m and math.isfinite(c.ci_low)
                             and math.isfinite(c.ci_high)]
    report["delta"] = {k: tuned_m[k] - base_m[k] for k in ("eval_loss", "exact_match")
                       if k in base_m and k in tuned_m}
    report["bootstrap"] = {"resamples": p.resamples, "seed": p.seed, "confidence": 0.95}
    return report


# ---- CreateEvaluation ---------------------------------------------------------------------------

MAX_TASKS = 16
MAX_SAMPLES_LIMIT = 10_000
MAX_NEW_TOKENS_LIMIT = 1024
MAX_RESAMPLES = 10_000
DEFAULT_MAX_SEQ_LENGTH = 1024


@dataclass(frozen=True)
class Request:
    """A CreateEvaluation request, validated; the usecase resolves its names to the tenant's
    records (version -> job, dataset -> split keys, task sources)."""

    model_name: str
    version: int
    base_model: str
    dataset_id: str
    split: str
    suite: str
    metrics: tuple[str, ...]
    tasks: tuple[dict[str, str], ...]
    max_samples: int
    max_new_tokens: int
    resamples: int
    seed: int
    idempotency_key: str = ""


def _bounded(field_name: str, value: int, default: int, limit: int) -> int:
    if value < 0 or value > limit:
        raise InvalidArgument(field_name, f"must be between 0 (default {default}) and {limit}")
    return value or default


def validate_request(*, model_name: str, version: int, base_model: str, dataset_id: str,
                     split: str, suite: str, metrics: list[str], tasks: list[dict[str, str]],
                     max_samples: int = 0, max_new_tokens: int = 0, resamples: int = 0,
                     seed: int = 0, idempotency_key: str = "") -> Request:
    if bool(model_name) == bool(base_model):
        raise InvalidArgument("model_name", "give a registry version (model_name and version) "
                                            "or a base_model, not both")
    if model_name and version < 1:
        raise InvalidArgument("version", "must be a version number (1 or more)")
    if not dataset_id:
        raise InvalidArgument("dataset_id", "required")
    if split and split not in SPLITS:
        raise InvalidArgument("split", f"must be one of {', '.join(SPLITS)}")
    try:
        names = suite_metrics(suite, metrics)
    except ValueError as e:
        raise InvalidArgument("suite" if "suite" in str(e) else "metrics", str(e)) from None
    if len(tasks) > MAX_TASKS:
        raise InvalidArgument("tasks", f"at most {MAX_TASKS} task files")
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        sources = [k for k in ("dataset_id", "key", "path") if t.get(k)]
        if len(sources) != 1:
            raise InvalidArgument(f"tasks[{i}]", "give exactly one of dataset_id, key, path")
        name = t.get("name", "")
        if not TASK_NAME.match(name):
            raise InvalidArgument(f"tasks[{i}].name", "1-64 letters, digits, '_', '.', '-'")
        if name in seen:
            raise InvalidArgument(f"tasks[{i}].name", f"{name!r} is named twice")
        seen.add(name)
        if t.get("scoring", "") not in ("", *SCORINGS):
            raise InvalidArgument(f"tasks[{i}].scoring", f"one of {', '.join(SCORINGS)}")
    if not names and not tasks:
        raise InvalidArgument("suite", "nothing to measure: the suite names no metric and no "
                                       "task file is given")
    return Request(
        model_name=model_name, version=version if model_name else 0, base_model=base_model,
        dataset_id=dataset_id, split=split, suite=suite or "default", metrics=names,
        tasks=tuple(dict(t) for t in tasks),
        max_samples=_bounded("max_samples", max_samples, 64, MAX_SAMPLES_LIMIT),
        max_new_tokens=_bounded("max_new_tokens", max_new_tokens, 32, MAX_NEW_TOKENS_LIMIT),
        resamples=_bounded("bootstrap_samples", resamples, DEFAULT_RESAMPLES, MAX_RESAMPLES),
        seed=seed, idempotency_key=idempotency_key,
    )


def choose_split(dataset_id: str, artifacts: dict[str, str], split: str) -> str:
    """The split to evaluate: the one asked for, else test when the dataset has one, else
    validation."""
    have = [s for s in SPLITS if artifacts.get(s)]
    chosen = split or ("test" if "test" in have else VALIDATION_SPLIT)
    if chosen not in have:
        raise FailedPrecondition(f"dataset {dataset_id} has no '{chosen}' split "
                                 f"(splits: {have or 'none'})")
    return chosen


def request_trigger(tenant: str, evaluation_id: str, idempotency_key: str) -> str:
    """One evaluation per (tenant, idempotency key); without a key, each request is new."""
    if not idempotency_key:
        return f"{REQUESTED}:{evaluation_id}"
    digest = hashlib.sha256(f"{tenant}\x00{idempotency_key}".encode()).hexdigest()[:48]
    return f"{REQUESTED}:{digest}"


def requested_evaluation(r: Request, *, tenant: str, actor: str, traceparent: str,
                         job: dict[str, Any] | None, split: str, split_key: str,
                         tasks: list[dict[str, str]]) -> Evaluation:
    """A running evaluation of `r`: of the version whose job is `job` (its base model vs its
    checkpoint), or of `r.base_model` alone; `tasks` resolved to keys or server paths."""
    evaluation_id = new_evaluation_id()
    if job is not None:
        spec = JobSpec.model_validate(job["spec"])
        base_model, checkpoint = spec.base_model, job["checkpoint_key"]
        max_seq_length = spec.hyperparameters.max_seq_length
    else:
        base_model, checkpoint, max_seq_length = r.base_model, "", DEFAULT_MAX_SEQ_LENGTH
    request = {
        "model_name": r.model_name, "version": r.version, "base_model": base_model,
        "checkpoint_key": checkpoint, "dataset_id": r.dataset_id, "split": split,
        "split_key": split_key, "suite": r.suite, "metrics": list(r.metrics), "tasks": tasks,
        "max_samples": r.max_samples, "max_new_tokens": r.max_new_tokens,
        "max_seq_length": max_seq_length, "resamples": r.resamples, "seed": r.seed,
    }
    return Evaluation(
        id=evaluation_id, job_id=(job or {}).get("job_id", ""), tenant=tenant, actor=actor,
        job=job or {}, traceparent=traceparent,
        trigger=request_trigger(tenant, evaluation_id, r.idempotency_key), request=request,
    )


def request_plan(ev: Evaluation) -> EvalPlan:
    """What to evaluate for a requested evaluation; every key again checked to lie in its
    tenant's prefix before anything is read."""
    r = ev.request
    checkpoint = r.get("checkpoint_key", "")
    tasks = []
    for t in r.get("tasks", []):
        if t.get("key"):
            check_tenant_key(t["key"], ev.tenant, f"task file {t['name']}")
        tasks.append(t)
    return EvalPlan(
        base_model=r["base_model"],
        validation_key=check_tenant_key(r["split_key"], ev.tenant, f"the {r['split']} split"),
        checkpoint_key=check_tenant_key(checkpoint, ev.tenant, "the checkpoint")
        if checkpoint else "",
        max_samples=r["max_samples"], max_new_tokens=r["max_new_tokens"],
        max_seq_length=r["max_seq_length"], metrics=tuple(r["metrics"]), tasks=tuple(tasks),
        resamples=r["resamples"], seed=r["seed"],
    )


def plan_of(ev: Evaluation) -> EvalPlan:
    if ev.requested:
        return request_plan(ev)
    return plan(JobCompleted.model_validate(ev.job), ev.tenant)

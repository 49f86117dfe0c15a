"""The evaluator's domain: an evaluation record, its inputs, and its report. Pure, no I/O."""

from __future__ import annotations

import math
import sys
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from llmstudio.artifactkeys import check_tenant_key, tenant_key
from llmstudio.events import EvalCompleted, EvalFailed, EventData, JobCompleted
from llmstudio.jobspec import JobSpec, format_validation_error

RUNNING, COMPLETED, FAILED = "running", "completed", "failed"
# What started an evaluation; one evaluation per (job, trigger).
ON_JOB_COMPLETED = "job.completed"
VALIDATION_SPLIT = "validation"
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
              report_key: str) -> Evaluation:
    return replace(ev, status=COMPLETED, base_metrics=base, tuned_metrics=tuned,
                   report_key=report_key, error="")


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
    validation_key: str
    checkpoint_key: str
    max_samples: int
    max_new_tokens: int
    max_seq_length: int


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


def build_report(
    ev: Evaluation, p: EvalPlan, base: dict[str, Any], tuned: dict[str, Any]
) -> dict[str, Any]:
    """The JSON report: both metric sets, their difference, and example generations."""
    base_m, tuned_m = headline(base, "base"), headline(tuned, "tuned")
    return {
        "evaluation_id": ev.id,
        "job_id": ev.job_id,
        "model_name": ev.job.get("model_name", ""),
        "base_model": p.base_model,
        "checkpoint_key": p.checkpoint_key,
        "validation_key": p.validation_key,
        "samples": base["samples"],
        "base": {"metrics": base_m, "examples": base["examples"]},
        "tuned": {"metrics": tuned_m, "examples": tuned["examples"]},
        "delta": {k: tuned_m[k] - base_m[k] for k in ("eval_loss", "exact_match")
                  if k in base_m and k in tuned_m},
    }

"""Evaluation events (stream EVALS)."""

from __future__ import annotations

from .base import EventData, register


@register
class EvalCompleted(EventData):
    TYPE = "llmstudio.eval.completed.v1"
    SUBJECT = "llmstudio.eval.completed"
    ENTITY = "evaluation_id"

    evaluation_id: str
    job_id: str
    model_name: str
    base_metrics: dict[str, float]
    tuned_metrics: dict[str, float]
    report_key: str


@register
class EvalFailed(EventData):
    TYPE = "llmstudio.eval.failed.v1"
    SUBJECT = "llmstudio.eval.failed"
    ENTITY = "evaluation_id"

    evaluation_id: str
    job_id: str
    reason: str

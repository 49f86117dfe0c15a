"""Registry domain logic: versions from jobs, evaluation metrics, the stage lifecycle."""

from __future__ import annotations

import pytest

from llmstudio.errors import FailedPrecondition, NotFound
from llmstudio.events import EvalCompleted, JobCompleted
from services.registry.core import (
    ALLOWED_TRANSITIONS,
    ModelVersion,
    Stage,
    check_transition,
    plan_stage_change,
    version_from_job,
    with_evaluation,
)

SPEC = {
    "base_model": "/models/smollm2",
    "dataset": "ds-1",
    "method": "lora",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": None},
    "hyperparameters": {"max_steps": 80, "learning_rate": 0.0002},
}


def job(job_id="job-1", **over) -> JobCompleted:
    fields = dict(
        job_id=job_id, worker_id="w1", model_name="smol-lora", spec=SPEC, dataset_id="ds-1",
        dataset_sha256="ab" * 32, dataset_artifacts={"train": "k/train"},
        checkpoint_key="ckpt/job-1/80", adapter_key="adapters/job-1", steps=80, final_loss=0.42,
        trace_id="",
    )
    fields.update(over)
    return JobCompleted(**fields)


def mv(version: int, stage: Stage) -> ModelVersion:
    return ModelVersion("acme", "smol-lora", version, stage, f"job-{version}")


def test_version_from_job_records_full_lineage_artifacts_and_metrics():
    v = version_from_job("acme", job(), 3, "t" * 32, "2030-01-01T00:00:00.000Z")
    assert (v.tenant, v.model_name, v.version, v.stage) == (
        "acme", "smol-lora", 3, Stage.DEVELOPMENT)
    assert v.ref == "smol-lora-v3"
    assert v.lineage == {
        "dataset_id": "ds-1",
        "dataset_sha256": "ab" * 32,
        "base_model": "/models/smollm2",
        "job_id": "job-1",
        "method": "lora",
        "hyperparameters": {
            "method": "lora", "lora": SPEC["lora"], "max_steps": 80, "learning_rate": 0.0002,
        },
        "trace_id": "t" * 32,
        "evaluation_id": "",
        "dataset_report_key": "",
    }
    assert v.artifacts == {"checkpoint": "ckpt/job-1/80", "adapter": "adapters/job-1"}
    assert v.metrics == {"final_loss": 0.42, "steps": 80.0}
    assert v.created_at == v.updated_at == "2030-01-01T00:00:00.000Z"


def test_evaluation_adds_prefixed_metrics_report_and_id_idempotently():
    v = version_from_job("acme", job(), 1, "", "t0")
    ev = EvalCompleted(
        evaluation_id="ev-1", job_id="job-1", model_name="smol-lora",
        base_metrics={"exact_match": 0.0, "eval_loss": 3.1},
        tuned_metrics={"exact_match": 0.95, "eval_loss": 0.4}, report_key="reports/ev-1.json",
    )
    once = with_evaluation(v, ev, "t1")
    assert once.metrics == {
        "final_loss": 0.42, "steps": 80.0, "base_exact_match": 0.0, "base_eval_loss": 3.1,
        "tuned_exact_match": 0.95, "tuned_eval_loss": 0.4,
    }
    assert once.lineage["evaluation_id"] == "ev-1"
    assert once.lineage["dataset_sha256"] == "ab" * 32
    assert once.artifacts == {
        "checkpoint": "ckpt/job-1/80", "adapter": "adapters/job-1",
        "eval_report": "reports/ev-1.json",
    }
    assert once.updated_at == "t1" and once.created_at == "t0"
    assert with_evaluation(once, ev, "t1") == once
    assert v.metrics == {"final_loss": 0.42, "steps": 80.0}  # the original is untouched


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (Stage.DEVELOPMENT, Stage.STAGING),
        (Stage.STAGING, Stage.PRODUCTION),
        (Stage.STAGING, Stage.DEVELOPMENT),
        (Stage.PRODUCTION, Stage.ARCHIVED),
        (Stage.DEVELOPMENT, Stage.ARCHIVED),
        (Stage.STAGING, Stage.ARCHIVED),
        (Stage.ARCHIVED, Stage.DEVELOPMENT),
    ],
)
def test_allowed_transitions(src, dst):
    check_transition(src, dst)
    moved, changes = plan_stage_change([mv(1, src)], 1, dst, "now")
    assert moved.stage == dst and moved.updated_at == "now"
    assert [(c.version.version, c.from_stage, c.to_stage) for c in changes] == [(1, src, dst)]


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (Stage.DEVELOPMENT, Stage.PRODUCTION),
        (Stage.PRODUCTION, Stage.STAGING),
        (Stage.PRODUCTION, Stage.DEVELOPMENT),
        (Stage.ARCHIVED, Stage.STAGING),
        (Stage.ARCHIVED, Stage.PRODUCTION),
    ],
)
def test_disallowed_transitions_name_both_stages(src, dst):
    with pytest.raises(FailedPrecondition) as err:
        plan_stage_change([mv(1, src)], 1, dst, "now")
    assert f"from {src} to {dst}" in str(err.value)


def test_every_stage_has_a_way_out_and_none_to_itself():
    for stage in Stage:
        assert ALLOWED_TRANSITIONS[stage] and stage not in ALLOWED_TRANSITIONS[stage]


def test_same_stage_is_a_no_op():
    current = mv(2, Stage.STAGING)
    moved, changes = plan_stage_change([mv(1, Stage.PRODUCTION), current], 2, Stage.STAGING, "now")
    assert moved == current and changes == []


def test_promoting_to_production_archives_the_previous_production_version_first():
    versions = [mv(1, Stage.PRODUCTION), mv(2, Stage.ARCHIVED), mv(3, Stage.STAGING)]
    moved, changes = plan_stage_change(versions, 3, Stage.PRODUCTION, "now")
    assert moved.stage == Stage.PRODUCTION and moved.version == 3
    assert [(c.version.version, c.from_stage, c.to_stage, c.version.stage) for c in changes] == [
        (1, Stage.PRODUCTION, Stage.ARCHIVED, Stage.ARCHIVED),
        (3, Stage.STAGING, Stage.PRODUCTION, Stage.PRODUCTION),
    ]


def test_unknown_version_is_not_found():
    with pytest.raises(NotFound, match="smol-lora has no version 9"):
        plan_stage_change([mv(1, Stage.DEVELOPMENT)], 9, Stage.STAGING, "now")

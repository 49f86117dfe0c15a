"""The evaluator's pure logic and its store (SQLite in a temp dir)."""

from __future__ import annotations

import math
import sys

import pytest

from llmstudio.events import Envelope, JobCompleted
from services.evaluator.core import (
    COMPLETED,
    FAILED,
    RUNNING,
    build_report,
    evaluation_for_job,
    headline,
    new_evaluation_id,
    plan,
    report_key,
)
from services.evaluator.store import EvaluationStore


def job(**over) -> JobCompleted:
    fields = dict(
        job_id="job-1", worker_id="w1", model_name="tiny-lora",
        spec={"base_model": "/models/tiny", "dataset": "ds-1",
              "hyperparameters": {"max_seq_length": 128},
              "eval": {"max_samples": 4, "max_new_tokens": 8}},
        dataset_id="ds-1", dataset_sha256="ab" * 32,
        dataset_artifacts={"train": "blobs/sha256/t", "validation": "blobs/sha256/v"},
        checkpoint_key="jobs/job-1/checkpoint-8", adapter_key="jobs/job-1/checkpoint-8",
        steps=8, final_loss=1.25,
    )
    fields.update(over)
    return JobCompleted(**fields)


def env(tenant="acme") -> Envelope:
    return Envelope(type=JobCompleted.TYPE, source="trainer", subject="job-1", tenant=tenant,
                    actor="alice", data={})


def result(loss=2.0, em=0.25):
    return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "exact_match": em, "samples": 4, "loss_tokens": 40,
            "examples": [{"prompt": "p", "reference": "r", "prediction": "x"}]}


def test_ids_and_keys():
    a, b = new_evaluation_id(), new_evaluation_id()
    assert a != b and a.startswith("ev-") and len(a) == 15 and int(a[3:], 16) >= 0
    assert report_key(a) == f"evaluations/{a}/report.json"


def test_plan_reads_limits_from_the_spec():
    p = plan(job())
    assert (p.base_model, p.validation_key, p.checkpoint_key) == (
        "/models/tiny", "blobs/sha256/v", "jobs/job-1/checkpoint-8")
    assert (p.max_samples, p.max_new_tokens, p.max_seq_length) == (4, 8, 128)


def test_plan_errors_name_what_is_missing():
    with pytest.raises(ValueError, match=r"no 'validation' split \(splits: \['train'\]\)"):
        plan(job(dataset_artifacts={"train": "t"}))
    with pytest.raises(ValueError, match=r"invalid spec: hyperparameters.max_steps"):
        plan(job(spec={"base_model": "m", "dataset": "d", "hyperparameters": {"max_steps": 0}}))
    with pytest.raises(ValueError, match="checkpoint_key"):
        plan(job(checkpoint_key=""))


def test_headline_metrics_are_finite():
    assert headline(result(2.0, 0.5), "base") == {
        "eval_loss": 2.0, "perplexity": math.exp(2.0), "exact_match": 0.5}
    assert headline(result(800.0), "base")["perplexity"] == sys.float_info.max
    with pytest.raises(ValueError, match=r"tuned model: eval_loss is nan"):
        headline(result(math.nan), "tuned")


def test_report_compares_base_and_tuned():
    ev = evaluation_for_job(env(), job(), "00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    report = build_report(ev, plan(job()), result(3.0, 0.0), result(1.0, 0.75))
    assert report["evaluation_id"] == ev.id and report["model_name"] == "tiny-lora"
    assert report["base"]["metrics"]["eval_loss"] == 3.0
    assert report["tuned"]["metrics"]["exact_match"] == 0.75
    assert report["delta"] == {"eval_loss": -2.0, "exact_match": 0.75}
    assert report["tuned"]["examples"][0]["prediction"] == "x"


def test_store_is_idempotent_per_job_and_tenant_scoped(tmp_path):
    store = EvaluationStore(f"sqlite:///{tmp_path / 'ev.db'}")
    first = evaluation_for_job(env(), job(), "tp")
    assert first.status == RUNNING and first.tenant == "acme" and first.actor == "alice"
    assert store.create(first)
    assert not store.create(evaluation_for_job(env(), job(), "tp"))  # same job: refused
    assert [e.id for e in store.list("acme")] == [first.id]
    assert store.list("acme", job_id="other") == []
    assert store.get(first.id, "other-tenant") is None and store.list("other-tenant") == []

    got = store.get(first.id, "acme")
    assert got.job["checkpoint_key"] == "jobs/job-1/checkpoint-8" and got.traceparent == "tp"
    assert got.created_at.tzinfo is not None
    assert [e.id for e in store.unfinished()] == [first.id]

    store.complete(first.id, {"eval_loss": 1.0}, {"eval_loss": 0.5}, "evaluations/x/report.json")
    got = store.get(first.id, "acme")
    assert got.status == COMPLETED and got.tuned_metrics == {"eval_loss": 0.5}
    assert [e.id for e in store.unfinished()] == [first.id]  # finished, not yet announced
    store.mark_announced(first.id)
    assert store.unfinished() == []

    second = evaluation_for_job(env(), job(job_id="job-2"), "")
    store.create(second)
    store.fail(second.id, "ValueError: boom")
    got = store.get(second.id, "acme")
    assert got.status == FAILED and got.error == "ValueError: boom"


def test_headline_without_reference_answers_has_no_exact_match():
    from services.evaluator.core import headline

    text_only = {"eval_loss": 2.0, "perplexity": 7.39, "exact_match": None}
    assert headline(text_only, "base") == {"eval_loss": 2.0, "perplexity": 7.39}
    scored = {"eval_loss": 2.0, "perplexity": 7.39, "exact_match": 0.5}
    assert headline(scored, "tuned")["exact_match"] == 0.5

"""The evaluator's pure logic and its store (SQLite in a temp dir)."""

from __future__ import annotations

import math
import sys

import pytest
from sqlalchemy.exc import IntegrityError

from llmstudio.artifactkeys import InvalidKey
from llmstudio.events import EvalCompleted, EvalFailed, JobCompleted
from services.evaluator.core import (
    COMPLETED,
    FAILED,
    RUNNING,
    build_report,
    completed,
    evaluation_for_job,
    failed,
    headline,
    new_evaluation_id,
    outcome_event,
    plan,
    report_key,
)
from services.evaluator.store import EvaluationStore

ACME = "tenants/acme"
CKPT = f"{ACME}/jobs/job-1/checkpoint-8"


def job(**over) -> JobCompleted:
    fields = dict(
        job_id="job-1", worker_id="w1", model_name="tiny-lora",
        spec={"base_model": "/models/tiny", "dataset": "ds-1",
              "hyperparameters": {"max_seq_length": 128},
              "eval": {"max_samples": 4, "max_new_tokens": 8}},
        dataset_id="ds-1", dataset_sha256="ab" * 32,
        dataset_artifacts={"train": f"{ACME}/datasets/t", "validation": f"{ACME}/datasets/v"},
        checkpoint_key=CKPT, adapter_key=CKPT,
        steps=8, final_loss=1.25,
    )
    fields.update(over)
    return JobCompleted(**fields)


def new(j: JobCompleted | None = None, traceparent: str = "tp"):
    return evaluation_for_job(j or job(), tenant="acme", actor="alice", traceparent=traceparent)


def result(loss=2.0, em=0.25):
    return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "exact_match": em, "samples": 4, "loss_tokens": 40,
            "examples": [{"prompt": "p", "reference": "r", "prediction": "x"}]}


def test_ids_and_keys():
    a, b = new_evaluation_id(), new_evaluation_id()
    assert a != b and a.startswith("ev-") and len(a) == 15 and int(a[3:], 16) >= 0
    assert report_key("acme", a) == f"{ACME}/evaluations/{a}/report.json"


def test_plan_reads_limits_from_the_spec():
    p = plan(job(), "acme")
    assert (p.base_model, p.validation_key, p.checkpoint_key) == (
        "/models/tiny", f"{ACME}/datasets/v", CKPT)
    assert (p.max_samples, p.max_new_tokens, p.max_seq_length) == (4, 8, 128)


def test_plan_errors_name_what_is_missing():
    with pytest.raises(ValueError, match=r"no 'validation' split \(splits: \['train'\]\)"):
        plan(job(dataset_artifacts={"train": "t"}), "acme")
    with pytest.raises(ValueError, match=r"invalid spec: hyperparameters.max_steps"):
        plan(job(spec={"base_model": "m", "dataset": "d", "hyperparameters": {"max_steps": 0}}),
             "acme")
    with pytest.raises(ValueError, match="checkpoint_key"):
        plan(job(checkpoint_key=""), "acme")


def test_plan_refuses_keys_outside_the_tenant():
    with pytest.raises(InvalidKey, match=r"checkpoint 'tenants/acme/jobs/job-1/checkpoint-8' is "
                                         r"not under tenant 'other'"):
        plan(job(dataset_artifacts={"validation": "tenants/other/v"}), "other")
    with pytest.raises(InvalidKey, match="validation split"):
        plan(job(), "other")
    with pytest.raises(InvalidKey, match="validation split"):
        plan(job(dataset_artifacts={"validation": "datasets/legacy/v"}), "acme")
    with pytest.raises(InvalidKey, match=r"'\.\.' segment"):
        plan(job(dataset_artifacts={"validation": "tenants/acme/../other/v"}), "acme")


def test_headline_metrics_are_finite():
    assert headline(result(2.0, 0.5), "base") == {
        "eval_loss": 2.0, "perplexity": math.exp(2.0), "exact_match": 0.5}
    assert headline(result(800.0), "base")["perplexity"] == sys.float_info.max
    with pytest.raises(ValueError, match=r"tuned model: eval_loss is nan"):
        headline(result(math.nan), "tuned")


def test_report_compares_base_and_tuned():
    ev = new(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    report = build_report(ev, plan(job(), "acme"), result(3.0, 0.0), result(1.0, 0.75))
    assert report["evaluation_id"] == ev.id and report["model_name"] == "tiny-lora"
    assert report["base"]["metrics"]["eval_loss"] == 3.0
    assert report["tuned"]["metrics"]["exact_match"] == 0.75
    assert report["delta"] == {"eval_loss": -2.0, "exact_match": 0.75}
    assert report["tuned"]["examples"][0]["prediction"] == "x"


def test_outcomes_and_the_events_announcing_them():
    ev = new()
    done = completed(ev, {"eval_loss": 1.0}, {"eval_loss": 0.5}, "evaluations/x/report.json")
    assert (done.status, done.error, ev.status) == (COMPLETED, "", RUNNING)
    assert outcome_event(done) == EvalCompleted(
        evaluation_id=ev.id, job_id="job-1", model_name="tiny-lora",
        base_metrics={"eval_loss": 1.0}, tuned_metrics={"eval_loss": 0.5},
        report_key="evaluations/x/report.json")
    bad = failed(ev, ValueError("x" * 3000))
    assert bad.status == FAILED
    assert bad.error.startswith("ValueError: xx") and len(bad.error) == 2000
    assert outcome_event(bad) == EvalFailed(evaluation_id=ev.id, job_id="job-1", reason=bad.error)


def test_store_is_idempotent_per_job_and_tenant_scoped(tmp_path):
    store = EvaluationStore(f"sqlite:///{tmp_path / 'ev.db'}")
    store.migrate()
    first = new()
    assert first.status == RUNNING and first.tenant == "acme" and first.actor == "alice"
    with store.unit() as u:
        assert u.for_job("job-1", first.trigger) is None
        u.add(first)
    with store.unit() as u:
        assert u.for_job("job-1", first.trigger).id == first.id
    # two replicas racing on the same JobCompleted cannot both insert
    with pytest.raises(IntegrityError), store.unit() as u:
        u.add(new())
    with store.unit() as u:
        assert [e.id for e in u.of_tenant("acme")] == [first.id]
        assert u.of_tenant("acme", job_id="other") == []
        assert u.get(first.id, "other-tenant") is None and u.of_tenant("other-tenant") == []
        got = u.get(first.id, "acme")
        assert got.job["checkpoint_key"] == CKPT and got.traceparent == "tp"
        assert got.created_at.tzinfo is not None
        assert [e.id for e in u.running()] == [first.id]
        u.save(completed(got, {"eval_loss": 1.0}, {"eval_loss": 0.5}, "evaluations/x/report.json"))
    with store.unit() as u:
        got = u.get(first.id, "acme")
        assert got.status == COMPLETED and got.tuned_metrics == {"eval_loss": 0.5}
        assert got.report_key == "evaluations/x/report.json" and u.running() == []
        second = new(job(job_id="job-2"), "")
        u.add(second)
        u.save(failed(second, ValueError("boom")))
    with store.unit() as u:
        got = u.get(second.id, "acme")
        assert got.status == FAILED and got.error == "ValueError: boom"


def test_headline_without_reference_answers_has_no_exact_match():
    from services.evaluator.core import headline

    text_only = {"eval_loss": 2.0, "perplexity": 7.39, "exact_match": None}
    assert headline(text_only, "base") == {"eval_loss": 2.0, "perplexity": 7.39}
    scored = {"eval_loss": 2.0, "perplexity": 7.39, "exact_match": 0.5}
    assert headline(scored, "tuned")["exact_match"] == 0.5

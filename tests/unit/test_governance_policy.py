"""Promotion policies, pure: parsing (errors name the field), each rule kind's verdict (naming
threshold and measured value), and the decision (rejected / pending_approval / approved)."""

from __future__ import annotations

import pytest

from llmstudio.errors import InvalidArgument
from services.governance.policy import (
    APPROVED,
    DEFAULT_POLICY,
    PENDING_APPROVAL,
    REJECTED,
    RULES,
    Approval,
    Facts,
    decide,
    may_approve,
    parse_policy,
)

FACTS = {
    "model_name": "m", "version": 3, "from_stage": "staging", "to_stage": "production",
    "requester": "key-dev", "evaluation_id": "ev-1", "evaluation_suites": ["default"],
    "metrics": {"base_exact_match": 0.2, "tuned_exact_match": 0.6, "base_eval_loss": 2.0,
                "tuned_eval_loss": 1.5},
    "intervals": {"exact_match": {"ci_low": 0.1, "ci_high": 0.7},
                  "eval_loss": {"ci_low": -0.9, "ci_high": 0.1}},
    "dataset_id": "ds-1", "dataset_sha256": "ab" * 32, "dataset_report": True,
    "dataset_pii_rows": 0, "production_version": 2,
    "production_metrics": {"tuned_exact_match": 0.7},
}


def check(rule_yaml: str, **changes) -> tuple[bool, str]:
    policy = parse_policy(f"stages:\n  production:\n    - {rule_yaml}\n")
    [verdict] = decide(policy, "production", Facts({**FACTS, **changes})).verdicts
    return verdict.ok, verdict.message


def test_every_rule_kind_is_registered():
    assert sorted(RULES) == ["approvals", "evaluated", "from_stage", "metric", "pii_clean",
                             "suites"]


def test_metric_rules_name_threshold_and_measured_value():
    assert check("metric: {name: exact_match, compare: base}") == (
        True, "metric exact_match: tuned 0.6 must be >= base 0.2 (threshold 0.2)")
    assert check("metric: {name: exact_match, compare: production}") == (
        False, "metric exact_match: tuned 0.6 must be >= production v2 0.7 (threshold 0.7)")
    assert check("metric: {name: exact_match, compare: production}", production_version=0)[0]
    assert check("metric: {name: exact_match, min: 0.5}") == (
        True, "metric exact_match: tuned 0.6 must be >= 0.5")
    # on the interval's lower end: base 0.2 + ci_low 0.1 = 0.3
    assert check("metric: {name: exact_match, min: 0.5, lower_bound: true}") == (
        False, "metric exact_match: tuned (95% interval's pessimistic end) 0.3 must be >= 0.5 "
        "(below the minimum 0.5)")
    # lower is better for a loss: its pessimistic end is base + ci_high
    assert check("metric: {name: eval_loss, compare: base, lower_bound: true}") == (
        False, "metric eval_loss: tuned (95% interval's pessimistic end) 2.1 must be <= base 2 "
        "(threshold 2)")
    assert check("metric: {name: perplexity, max: 3}") == (
        False, "metric perplexity: not measured for m@3")
    # primary: exact_match when measured, else eval_loss
    assert "metric exact_match" in check("metric: {name: primary, compare: base}")[1]
    ok, msg = check("metric: {name: primary, compare: base}",
                    metrics={"base_eval_loss": 2.0, "tuned_eval_loss": 2.5})
    assert not ok and msg.startswith("metric eval_loss: tuned 2.5 must be <= base 2")


def test_stage_evaluation_suite_and_pii_rules():
    assert check("from_stage: {stage: staging}")[0]
    assert check("from_stage: {stage: staging}", from_stage="development") == (
        False, "from_stage: must be in staging; m@3 is in development")
    assert check("evaluated: {}", evaluation_id="") == (
        False, "evaluated: m@3 has no evaluation yet")
    assert check("suites: {required: [default, safety]}") == (
        False, "suites: m@3 lacks an evaluation of suite(s) safety (evaluated: default)")
    assert check("pii_clean: {}")[0]
    assert check("pii_clean: {}", dataset_pii_rows=3,
                 dataset_pii_counts={"email": 2, "phone": 1}) == (
        False, "pii_clean: PII found in dataset ds-1 (sha256 abababababab): 3 row(s) "
        "(email 2, phone 1); redact it and retrain")
    assert check("pii_clean: {}", dataset_report=False) == (
        False, "pii_clean: dataset ds-1 (sha256 abababababab) has no report: its PII status is "
        "unknown")


def test_approvals_count_distinct_approvers_other_than_the_requester():
    policy = parse_policy("stages:\n  production:\n    - approvals: {count: 2}\n")

    def status(*approvals: Approval) -> str:
        return decide(policy, "production", Facts(FACTS, approvals)).status

    reviewer, admin = Approval("key-r", ("reviewer",)), Approval("key-a", ("admin",))
    assert status() == PENDING_APPROVAL
    assert status(Approval("key-dev", ("admin",)), reviewer) == PENDING_APPROVAL  # self
    assert status(Approval("key-v", ("developer",)), reviewer) == PENDING_APPROVAL
    assert status(reviewer, admin) == APPROVED
    assert may_approve(policy, "production", ("reviewer",))
    assert not may_approve(policy, "production", ("developer",))


def test_decision_rejects_on_any_failing_rule_but_approvals():
    facts = Facts({**FACTS, "metrics": {"base_exact_match": 0.5, "tuned_exact_match": 0.4}})
    decision = decide(DEFAULT_POLICY, "production", facts)
    assert decision.status == REJECTED
    assert decision.unmet == [
        "metric exact_match: tuned 0.4 must be >= base 0.5 (threshold 0.5)",
        "approvals: 0 of 1 approval(s) by a reviewer other than the requester: missing 1"]
    assert decide(DEFAULT_POLICY, "staging", Facts(FACTS)).status == APPROVED
    assert decide(DEFAULT_POLICY, "production", Facts(FACTS)).status == PENDING_APPROVAL
    assert DEFAULT_POLICY.gated_stages == ["staging", "production"]


@pytest.mark.parametrize("text, error", [
    ("stages: [1]", "stages must map a stage"),
    ("stages:\n  archived: []\n", "stages.archived: only staging and production can be gated"),
    ("stages:\n  staging:\n    - nope: {}\n", "stages.staging[0]: unknown rule 'nope'"),
    ("stages:\n  staging:\n    - metric: {name: x}\n", "stages.staging[0].metric: give min"),
    ("stages:\n  staging:\n    - metric: {name: x, min: high}\n", "min must be a number"),
    ("stages:\n  staging:\n    - approvals: {count: 1, role: viewer}\n",
     "role must be reviewer or admin"),
    ("stages:\n  staging:\n    - approvals: {}\n    - approvals: {}\n", "at most one approvals"),
    ("other: 1", "must be a mapping with one key, stages"),
    ("stages: {a: [", "not valid YAML"),
])
def test_invalid_policies_are_refused_naming_where(text, error):
    with pytest.raises(InvalidArgument) as err:
        parse_policy(text)
    assert err.value.field == "policy" and error in err.value.reason


def test_registry_default_gates_match_governance_default_policy():
    from services.registry.core import DEFAULT_GATED_STAGES

    assert list(DEFAULT_GATED_STAGES) == DEFAULT_POLICY.gated_stages

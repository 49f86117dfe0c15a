"""The pure parts of the registry's depth: alias names, tags, comparisons, model cards, what may
be deleted; and serving's NAME@ALIAS targets."""

from __future__ import annotations

import pytest

from llmstudio.errors import FailedPrecondition, InvalidArgument
from services.registry import core
from services.registry.core import ModelVersion, Stage
from services.serving import core as serving


def version(number: int, **over) -> ModelVersion:
    fields = dict(tenant="acme", model_name="m", version=number, stage=Stage.DEVELOPMENT,
                  job_id=f"job-{number}",
                  lineage={"dataset_id": "ds", "dataset_sha256": "ab", "base_model": "/b",
                           "method": "lora",
                           "hyperparameters": {"lora": {"r": 8, "alpha": 16}, "max_steps": 5}},
                  metrics={"tuned_exact_match": 0.5, "final_loss": 1.0})
    fields.update(over)
    return ModelVersion(**fields)


@pytest.mark.parametrize("alias", ["champion", "candidate", "v2-canary", "A_1"])
def test_alias_names(alias):
    assert core.check_alias(alias) == alias


@pytest.mark.parametrize("alias", ["production", "staging", "archived", "development", "latest",
                                   "3", "", "two words", "a.b", "-x"])
def test_refused_alias_names(alias):
    with pytest.raises(InvalidArgument) as err:
        core.check_alias(alias)
    assert err.value.field == "alias"


def test_with_aliases_names_each_version_by_its_aliases():
    named = core.with_aliases([version(1), version(2)], {"champion": 2, "candidate": 2, "old": 1})
    assert [v.aliases for v in named] == [("old",), ("candidate", "champion")]


def test_tags_are_set_removed_and_checked():
    assert core.updated_tags({"a": "1", "b": "2"}, {"c": "3", "a": "9"}, ["b"]) == {
        "a": "9", "c": "3"}
    for set_tags, remove in (({"bad key": "x"}, []), ({"k": "x" * 257}, []), ({"k": "v"}, ["k"]),
                             ({f"k{i}": "v" for i in range(51)}, [])):
        with pytest.raises(InvalidArgument):
            core.updated_tags({}, set_tags, remove)
    with pytest.raises(InvalidArgument):
        core.check_description("x" * 4001)


def test_comparison_deltas_intervals_and_differing_hyperparameters_only():
    a = version(1)
    b = version(2, metrics={"tuned_exact_match": 0.75, "eval_only": 2.0},
                lineage={**a.lineage, "dataset_sha256": "cd",
                         "hyperparameters": {"lora": {"r": 16, "alpha": 16}, "max_steps": 5,
                                             "seed": 1}})
    c = core.compare_versions(a, b, {}, {"exact_match": {"ci_low": 0.1, "ci_high": 0.4}})
    metrics = {m.name: m for m in c.metrics}
    assert metrics["tuned_exact_match"].delta == 0.25
    assert metrics["tuned_exact_match"].b_interval == (0.1, 0.4)
    assert metrics["tuned_exact_match"].a_interval is None
    assert (metrics["final_loss"].b, metrics["final_loss"].delta) == (None, None)
    assert (metrics["eval_only"].a, metrics["eval_only"].b) == (None, 2.0)
    assert [(d.key, d.a, d.b) for d in c.hyperparameters if d.has_a] == [("lora.r", 8, 16)]
    [seed] = [d for d in c.hyperparameters if not d.has_a]
    assert (seed.key, seed.b) == ("seed", 1)
    assert {d.key: d.same for d in c.dataset} == {
        "dataset_id": True, "dataset_sha256": False, "base_model": True, "method": True}


def test_model_card_is_deterministic_and_says_what_it_could_not_read():
    v = version(2, stage=Stage.STAGING, aliases=("champion",), tags={"team": "nlp"})
    card = core.model_card(v, "a model")
    assert card == core.model_card(v, "a model")
    assert card.startswith("---\nlibrary_name: peft\n") and '  - "team=nlp"' in card
    assert "| aliases | champion |" in card and "| lora.r | 8 |" in card
    assert "The dataset's report is not readable here." in card
    assert "Base vs tuned" not in card and "| tuned_exact_match | 0.5 |" in card
    assert "Not evaluated yet." in core.model_card(version(3, metrics={}))


def test_delete_refuses_production_and_aliased_versions():
    core.check_deletable(version(1, stage=Stage.ARCHIVED), {"champion": 2})
    with pytest.raises(FailedPrecondition, match="in production"):
        core.check_deletable(version(1, stage=Stage.PRODUCTION), {})
    with pytest.raises(FailedPrecondition, match="champion"):
        core.check_deletable(version(2), {"champion": 2})


def test_serving_targets_a_version_a_stage_or_an_alias():
    assert serving.parse_target("m@3") == serving.Target("m", version=3)
    assert serving.parse_target("m@production") == serving.Target("m", follows="production")
    assert serving.parse_target("m@champion") == serving.Target("m", follows="champion")
    assert serving.follows_alias("champion") and not serving.follows_alias("production")
    for bad in ("m@archived", "m@latest", "m@0", "m@a b", "m"):
        with pytest.raises(InvalidArgument):
            serving.parse_target(bad)


def test_an_alias_removed_leaves_its_deployments_where_they_are():
    d = serving.Deployment("acme", "champ", "m", 1, follows="champion")
    assert serving.switched(d, "m", 2, "champion", "now").version == 2
    assert serving.switched(d, "m", 0, "champion", "now") is None
    assert serving.switched(d, "m", 2, "production", "now") is None

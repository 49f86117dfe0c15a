"""The trainer's tables agree with the kernel's: every JobSpec objective has a recipe."""

from __future__ import annotations

import typing

import pytest

from llmstudio.jobspec import JobSpec, Objective
from services.trainer.recipes import RECIPES, preference, sft


def test_every_objective_has_its_recipe():
    assert set(RECIPES) == set(typing.get_args(Objective))
    assert RECIPES["sft"] is RECIPES["pretrain"] is sft.train
    assert RECIPES["dpo"] is RECIPES["orpo"] is preference.train


@pytest.mark.parametrize("hp, distributed, field", [
    ({"eval_every": 2}, {}, "eval_every"),
    ({"packing": True}, {}, "packing"),
    ({}, {"num_processes": 2}, "num_processes"),
])
def test_what_only_the_sft_recipe_does_is_refused_for_preference(hp, distributed, field):
    with pytest.raises(ValueError, match=field):
        JobSpec(base_model="m", dataset="d", objective="dpo", hyperparameters=hp,
                distributed=distributed)
    JobSpec(base_model="m", dataset="d", objective="sft", hyperparameters=hp,
            distributed=distributed)

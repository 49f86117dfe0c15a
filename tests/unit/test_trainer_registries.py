"""The trainer's tables agree with the kernel's: every JobSpec objective has a recipe, every
method of the kernel's table (llmstudio.jobspec.METHODS) has exactly one trainer entry, and
the JobSpec reads the methods' capabilities from that table."""

from __future__ import annotations

import typing

import pytest

from llmstudio.jobspec import METHODS, JobSpec, Method, Objective
from services.trainer.methods import REGISTRY
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


def test_kernel_and_trainer_list_the_same_methods():
    assert list(REGISTRY) == list(METHODS) == list(typing.get_args(Method))
    for name, traits in METHODS.items():
        assert (REGISTRY[name].peft_config is None) == (not traits.peft), name


def test_the_jobspec_reads_capabilities_from_the_table():
    for name, traits in METHODS.items():
        spec = {"base_model": "m", "dataset": "d", "method": name}
        if traits.fsdp:
            JobSpec(**spec, distributed={"strategy": "fsdp", "num_processes": 2})
        else:
            with pytest.raises(ValueError, match=f"fsdp does not support method {name}"):
                JobSpec(**spec, distributed={"strategy": "fsdp", "num_processes": 2})
        if traits.prompt_learning:
            with pytest.raises(ValueError, match=f"dpo does not support method {name}"):
                JobSpec(**spec, objective="dpo")
        else:
            JobSpec(**spec, objective="dpo")
    assert [m for m, t in METHODS.items() if t.needs_bitsandbytes] == ["qlora", "lora_8bit"]
    assert [m for m, t in METHODS.items() if not t.mergeable] == [
        "prefix_tuning", "prompt_tuning", "p_tuning"]

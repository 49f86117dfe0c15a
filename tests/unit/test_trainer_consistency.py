"""One answer to each question, wherever it is asked: every JobSpec objective has a recipe,
every method of the kernel's table (llmstudio.jobspec.METHODS) has exactly one trainer entry
and the JobSpec reads its capabilities from that table, and the heartbeat reports bf16 exactly
where the hardware check lets a bf16 job run."""

from __future__ import annotations

import typing

import pytest
import torch

from llmstudio.config import Settings
from llmstudio.jobspec import METHODS, JobSpec, Method, Objective
from services.trainer import host
from services.trainer.methods import REGISTRY, UnsupportedOnHardware, check_hardware
from services.trainer.recipes import RECIPES, preference, sft
from services.trainer.worker import Worker

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512 = AVX2.replace("fma", "fma avx512f avx512bw avx512vl")  # bf16 emulated, slowly
AVX512_BF16 = AVX512.replace("avx512vl", "avx512vl avx512_bf16")
AMX = AVX2.replace("fma", "fma amx_tile amx_bf16")


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


@pytest.mark.parametrize("cpuinfo, native", [
    (AVX2, False), (AVX512, False), (AVX512_BF16, True), (AMX, True), ("", False),
    (None, None),  # this machine's own /proc/cpuinfo
])
def test_heartbeat_and_hardware_check_agree_on_bf16(cpuinfo, native, monkeypatch, tmp_path):
    if cpuinfo is not None:
        monkeypatch.setattr(host, "cpu_info", lambda: cpuinfo)
    worker = Worker(Settings(data_dir=tmp_path), bus=None, store=None, runs=None, outbox=None)
    worker.device = "cpu"  # the CPU worker's heartbeat, on any machine
    reported = worker.hardware()
    try:
        check_hardware(JobSpec(base_model="m", dataset="d", precision="bf16"), torch.device("cpu"))
        runs = True
    except UnsupportedOnHardware:
        runs = False
    assert reported["bf16"] is runs
    if native is not None:
        assert runs is native
    assert reported["memory_bytes"] > 0

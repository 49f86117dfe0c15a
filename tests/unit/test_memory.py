"""The memory pre-flight estimate (pure: no torch, no model files)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmstudio.jobspec import JobSpec
from llmstudio.ml.memory import (
    KEYS,
    estimate_memory,
    model_config_of,
    param_count,
    trainable_params,
)

# SmolLM2-135M-Instruct's config.json (HuggingFaceTB/SmolLM2-135M-Instruct), as shipped.
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "unk_token_id": 0,
    "use_cache": True,
    "vocab_size": 49152,
}
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
        "n_positions": 1024}


def spec(**kw) -> JobSpec:
    hp = kw.pop("hyperparameters", {})
    return JobSpec.model_validate({"base_model": "/m", "dataset": "ds", **kw,
                                   "hyperparameters": hp})


def test_param_counts_match_the_published_sizes():
    assert param_count(SMOLLM2) == pytest.approx(134.5e6, rel=0.02)
    assert param_count(GPT2) == pytest.approx(124.4e6, rel=0.02)  # GPT-2 small: 124M
    untied = param_count({**SMOLLM2, "tie_word_embeddings": False})
    assert untied - param_count(SMOLLM2) == 49152 * 576  # the separate lm_head


def test_lora_trains_the_attention_projections_by_default():
    # r=8 on q (576->576), k, v (576->192), o (576->576), 30 layers: PEFT's 921,600
    assert trainable_params(SMOLLM2, spec(method="lora")) == 921_600
    wider = spec(method="lora", lora={"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                  "o_proj", "up_proj"]})
    assert trainable_params(SMOLLM2, wider) > 921_600
    assert trainable_params(SMOLLM2, spec(method="full")) == param_count(SMOLLM2)


def test_estimate_has_every_part_and_adds_up():
    est = estimate_memory(SMOLLM2, spec(method="full"))
    assert set(est) == set(KEYS)
    assert all(v > 0 for v in est.values())
    assert est["total"] == sum(v for k, v in est.items() if k != "total")
    # full fine-tuning in fp32: 4 B weights + 4 B gradients + 8 B AdamW per parameter
    assert est["weights"] == pytest.approx(param_count(SMOLLM2) * 4, rel=0.001)
    assert est["optimizer"] == pytest.approx(param_count(SMOLLM2) * 8, rel=0.001)


def test_quantized_adapters_need_less_than_lora_less_than_full():
    qlora = estimate_memory(SMOLLM2, spec(method="qlora"))["total"]
    lora = estimate_memory(SMOLLM2, spec(method="lora"))["total"]
    full = estimate_memory(SMOLLM2, spec(method="full"))["total"]
    assert qlora < lora < full
    eight_bit = estimate_memory(SMOLLM2, spec(method="full", hyperparameters={
        "optimizer": "adamw_8bit"}))
    assert eight_bit["optimizer"] == pytest.approx(param_count(SMOLLM2) * 2, rel=0.001)


def test_activations_scale_with_batch_and_shrink_with_checkpointing():
    base = estimate_memory(SMOLLM2, spec(hyperparameters={"batch_size": 4}))
    double = estimate_memory(SMOLLM2, spec(hyperparameters={"batch_size": 8}))
    assert double["activations"] == pytest.approx(2 * base["activations"], rel=1e-6)
    ckpt = estimate_memory(SMOLLM2, spec(hyperparameters={"batch_size": 4,
                                                          "gradient_checkpointing": True}))
    assert ckpt["activations"] < base["activations"] / 2
    assert ckpt["weights"] == base["weights"]


def test_fsdp_shards_the_model_state():
    one = estimate_memory(SMOLLM2, spec(method="full"))
    four = estimate_memory(SMOLLM2, spec(method="full", distributed={"num_processes": 4,
                                                                     "strategy": "fsdp"}))
    assert four["optimizer"] == pytest.approx(one["optimizer"] / 4, rel=1e-6)
    assert four["activations"] == one["activations"]


@pytest.mark.parametrize("config", [{}, {"model_type": "llama"}, {"model_type": "mystery",
                                                                   "hidden_size": "big"}])
def test_unknown_config_gives_no_estimate(config):
    assert estimate_memory(config, spec()) == {}


def test_model_config_of_reads_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    assert model_config_of(str(tmp_path)) == SMOLLM2
    assert model_config_of(str(tmp_path / "missing")) is None
    assert model_config_of("HuggingFaceTB/SmolLM2-135M") is None  # a hub id
    (tmp_path / "config.json").write_text("not json")
    assert model_config_of(str(tmp_path)) is None


def test_the_estimate_imports_no_torch():  # the scheduler runs it and has no torch
    code = "import sys, llmstudio.ml.memory; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

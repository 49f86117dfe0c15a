"""Data parallel: 2 CPU processes (gloo) match one process at the same global batch size, with
DDP and with FSDP (sharded parameters, gradients and optimizer state); FSDP checkpoints hold
the full state, and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llmstudio.jobspec import JobSpec
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.distributed import train_distributed

ROWS = [
    {"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
    for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree", "bird")
]


def make_spec(
    model_dir: str, *, processes: int, batch_size: int, strategy: str = "ddp", method: str = "lora"
) -> JobSpec:
    return JobSpec(
        base_model=model_dir, dataset="unit", method=method,
        lora={"r": 8, "alpha": 16, "dropout": 0.0},  # dropout masks differ per rank otherwise
        hyperparameters={"max_steps": 4, "batch_size": batch_size, "learning_rate": 1e-2,
                         "seed": 5, "log_every": 1, "checkpoint_every": 2,
                         "gradient_accumulation_steps": 2},
        distributed={"num_processes": processes, "strategy": strategy},
    )


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def train(spec: JobSpec, out, **kwargs):
    """(result, metrics, checkpoint steps) of `train_distributed`."""
    metrics, ckpts = [], []
    result = train_distributed(
        spec,
        spec.base_model,
        ROWS,
        out,
        on_metrics=metrics.append,
        on_checkpoint=lambda p, s: ckpts.append(s),
        **kwargs,
    )
    return result, metrics, ckpts


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The reference: one process, batch size 4 (the global batch of 2 processes x 2)."""
    return train(make_spec(model_dir, processes=1, batch_size=4), tmp_path_factory.mktemp("one"))


def assert_same_weights(a_dir, b_dir, file="adapter_model.safetensors"):
    a, b = load_file(str(a_dir / file)), load_file(str(b_dir / file))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_at_the_same_global_batch(single, model_dir, strategy, tmp_path):
    (one, m1, c1) = single
    (two, m2, c2) = train(
        make_spec(model_dir, processes=2, batch_size=2, strategy=strategy), tmp_path / strategy
    )
    assert two.steps == one.steps == 4
    assert c1 == c2 == [2, 4]  # rank 0 alone reports (and writes) checkpoints
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # rank 0 alone reports metrics
    assert [m["epoch"] for m in m1] == [m["epoch"] for m in m2]
    for a, b in zip(m1, m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert m2[-1]["loss"] < m2[0]["loss"]
    assert two.tokens_seen == one.tokens_seen
    # full (unsharded) weights and optimizer state, as one process writes them
    assert_same_weights(one.adapter_dir, two.adapter_dir)
    assert_same_weights(one.adapter_dir, two.adapter_dir, "optimizer.safetensors")
    assert sorted(p.name for p in (tmp_path / strategy).iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


def test_fsdp_resumes_its_checkpoint(single, model_dir, tmp_path):
    """An FSDP run resumed from a single process's step-2 checkpoint ends where the single
    process did: the checkpoint format is the same, and the full optimizer state is sharded
    back (a wrong moment would show in the step-3 and step-4 losses)."""
    one, m1, _ = single
    spec = make_spec(model_dir, processes=2, batch_size=2, strategy="fsdp")
    resumed, m2, c2 = train(
        spec, tmp_path / "resumed", resume_from=one.adapter_dir.parent / "checkpoint-2"
    )
    assert resumed.steps == 4 and c2 == [4]
    assert [m["step"] for m in m2] == [3, 4]
    for a, b in zip(m1[2:], m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert_same_weights(one.adapter_dir, resumed.adapter_dir)


def test_fsdp_full_fine_tune_matches_one_process(model_dir, tmp_path):
    """Full fine-tune: every weight sharded (embeddings and the tied output head in the root
    group); the checkpoint holds the whole model, unsharded."""
    runs = {
        name: train(
            make_spec(model_dir, processes=n, batch_size=4 // n, strategy=strategy, method="full"),
            tmp_path / name,
        )
        for name, n, strategy in (("one", 1, "ddp"), ("fsdp", 2, "fsdp"))
    }
    (one, m1, _), (two, m2, _) = runs["one"], runs["fsdp"]
    for a, b in zip(m1, m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert_same_weights(one.adapter_dir, two.adapter_dir, "model.safetensors")


@pytest.mark.parametrize("method", ["qlora", "lora_8bit", "adalora", "prompt_tuning"])
def test_fsdp_refuses_methods_it_does_not_shard(method):
    with pytest.raises(ValueError, match=f"fsdp does not support method {method}; use ddp"):
        make_spec("unused", processes=2, batch_size=2, strategy="fsdp", method=method)


def test_fsdp_refuses_8bit_optimizers():
    spec = make_spec("unused", processes=2, batch_size=2).model_dump()
    spec["distributed"]["strategy"] = "fsdp"
    spec["hyperparameters"]["optimizer"] = "adamw_8bit"
    with pytest.raises(ValueError, match="fsdp does not support optimizer adamw_8bit"):
        JobSpec.model_validate(spec)

"""Data parallel: 2 CPU processes (gloo) match one process at the same global batch size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llmstudio.jobspec import JobSpec
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.distributed import train_distributed
from services.trainer.methods import UnsupportedOnHardware

ROWS = [
    {"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
    for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun", "tree", "bird")
]


def make_spec(model_dir: str, *, processes: int, batch_size: int, strategy: str = "ddp") -> JobSpec:
    return JobSpec(
        base_model=model_dir, dataset="unit",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},  # dropout masks differ per rank otherwise
        hyperparameters={"max_steps": 4, "batch_size": batch_size, "learning_rate": 1e-2,
                         "seed": 5, "log_every": 1, "checkpoint_every": 2,
                         "gradient_accumulation_steps": 2},
        distributed={"num_processes": processes, "strategy": strategy},
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    model_dir = str(build_tiny_model(tmp_path / "m"))
    runs = {}
    for name, processes, bs in (("single", 1, 4), ("ddp", 2, 2)):
        metrics, ckpts = [], []
        result = train_distributed(
            make_spec(model_dir, processes=processes, batch_size=bs), model_dir, ROWS,
            tmp_path / name, on_metrics=metrics.append,
            on_checkpoint=lambda p, s, c=ckpts: c.append(s),
        )
        runs[name] = (result, metrics, ckpts)
    (single, m1, c1), (ddp, m2, c2) = runs["single"], runs["ddp"]
    assert ddp.steps == single.steps == 4
    assert c1 == c2 == [2, 4]  # rank 0 alone reports (and writes) checkpoints
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # rank 0 alone reports metrics
    assert [m["epoch"] for m in m1] == [m["epoch"] for m in m2]
    for a, b in zip(m1, m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert m2[-1]["loss"] < m2[0]["loss"]
    assert ddp.tokens_seen == single.tokens_seen
    w1 = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    w2 = load_file(str(ddp.adapter_dir / "adapter_model.safetensors"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_fsdp_is_refused_on_cpu(tmp_path):
    spec = make_spec(str(tmp_path / "unused"), processes=2, batch_size=2, strategy="fsdp")
    with pytest.raises(UnsupportedOnHardware, match="fsdp.*CUDA"):
        train_distributed(spec, spec.base_model, ROWS, tmp_path / "out")

"""DPO and ORPO through TRL on the tiny model: the reward margin grows on a toy preference set,
metrics and stop requests flow through the callback, checkpoints have the recipe's layout, and a
run stopped at a checkpoint and resumed from it reaches the same losses as an uninterrupted one."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import (
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    latest_checkpoint,
    verify_checkpoint,
)
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.recipes import TrainRequest, preference, train

PAIRS = [
    ("sky", "blue", "green"), ("grass", "green", "blue"), ("snow", "white", "black"),
    ("coal", "black", "white"), ("sun", "yellow", "purple"), ("blood", "red", "blue"),
    ("night", "dark", "bright"), ("fire", "hot", "cold"),
]
ROWS = [
    {"prompt": f"Q: color of {a}?\nA:", "chosen": f" {good}", "rejected": f" {bad}"}
    for a, good, bad in PAIRS
] * 2  # 16 rows


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny"))


def _spec(model_dir: str, objective: str, **hp) -> JobSpec:
    hyper = {"max_steps": 10, "batch_size": 8, "learning_rate": 5e-3, "log_every": 1, **hp}
    return JobSpec(
        base_model=model_dir, dataset="ds", method="lora", objective=objective,
        preference={"beta": 0.1}, hyperparameters=hyper,
    )


def _run(tiny, tmp_path, objective, **hp):
    metrics, ckpts = [], []
    result = train(TrainRequest(
        _spec(tiny, objective, **hp), ROWS, tmp_path / "out",
        on_metrics=metrics.append, on_checkpoint=lambda p, s: ckpts.append((p, s)),
    ))
    return result, metrics, ckpts


def _check_final_checkpoint(result, ckpts, steps):
    assert result.steps == steps and not result.stopped
    ckpt = result.adapter_dir
    assert ckpt is not None and ckpt.name == f"checkpoint-{steps}"
    assert ckpts[-1] == (ckpt, steps)
    manifest = verify_checkpoint(ckpt)  # manifest.json present, every hash matches
    listed = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", TRAINER_STATE} <= listed
    assert not any(p.startswith("ref/") for p in listed)  # TRL's reference copy is not saved
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    assert state["step"] == steps and state["objective"] in ("dpo", "orpo")
    assert (ckpt / MANIFEST).is_file()


@pytest.mark.slow
def test_dpo_reward_margin_grows(tiny, tmp_path):
    result, metrics, ckpts = _run(tiny, tmp_path, "dpo", max_steps=8)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for m in metrics:
        assert m["max_steps"] == 8
        assert {"loss", "learning_rate", "rewards/margins", "rewards/chosen",
                "rewards/rejected"} <= set(m)
    margins = [m["rewards/margins"] for m in metrics]
    # Step 1: policy == reference, so the DPO margin is 0 and the loss log(2).
    assert margins[0] == pytest.approx(0.0, abs=1e-4)
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert margins[-1] > 0.3 and margins[-1] > margins[0]
    assert statistics.mean(margins[-3:]) > statistics.mean(margins[:3])
    assert metrics[-1]["rewards/chosen"] > metrics[-1]["rewards/rejected"]
    assert result.final_loss < result.first_loss
    assert result.tokens_seen > 8 * 8 and metrics[-1]["tokens_per_s"] > 0
    _check_final_checkpoint(result, ckpts, 8)


@pytest.mark.slow
def test_orpo_reward_margin_grows(tiny, tmp_path):
    result, metrics, ckpts = _run(tiny, tmp_path, "orpo", max_steps=16)
    margins = [m["rewards/margins"] for m in metrics]
    assert len(margins) == 16
    assert margins[-1] > 0 and margins[-1] > margins[0]
    assert statistics.mean(margins[-3:]) > statistics.mean(margins[:3])
    assert result.final_loss < result.first_loss  # NLL on chosen + odds-ratio term
    _check_final_checkpoint(result, ckpts, 16)


@pytest.mark.slow
def test_stop_request_and_periodic_checkpoints(tiny, tmp_path):
    metrics, ckpts = [], []
    result = train(TrainRequest(
        _spec(tiny, "dpo", max_steps=10, checkpoint_every=1), ROWS, tmp_path / "out",
        on_metrics=metrics.append, should_stop=lambda: len(ckpts) >= 2,
        on_checkpoint=lambda p, s: ckpts.append((p, s)),
    ))
    # asked to stop once checkpoint-2 was announced: stops at that step boundary, and the
    # final checkpoint is not rewritten
    assert result.stopped and result.steps == 2 and result.stop_reason == "stopped"
    assert [s for _, s in ckpts] == [1, 2]
    assert [m["step"] for m in metrics] == [1, 2]
    for path, _ in ckpts:
        verify_checkpoint(path)
    assert result.adapter_dir == ckpts[-1][0]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_stopped_run_resumes_to_the_same_losses(tiny, tmp_path, objective):
    # 16 rows, 4 a step: checkpoint-5 is one batch into the second epoch, so resuming must skip
    # that batch of the epoch's shuffle; warmup makes the learning rate schedule matter.
    n, k = 10, 5
    spec = _spec(
        tiny,
        objective,
        max_steps=n,
        batch_size=4,
        warmup_steps=3,
        checkpoint_every=k,
        keep_last_checkpoints=1,
    )
    keys = ("loss", "rewards/margins", "rewards/chosen", "learning_rate", "epoch")

    reference: dict[int, dict] = {}
    full = train(TrainRequest(
        spec, ROWS, tmp_path / "full", on_metrics=lambda m: reference.__setitem__(m["step"], m),
    ))
    assert full.steps == n and sorted(reference) == list(range(1, n + 1))

    # 1. stopped once checkpoint-k is announced (as the worker is on shutdown)
    out, first, ckpts = tmp_path / "out", {}, []
    stopped = train(TrainRequest(
        spec, ROWS, out,
        on_metrics=lambda m: first.__setitem__(m["step"], m),
        should_stop=lambda: bool(ckpts),
        on_checkpoint=lambda p, s: ckpts.append(s),
    ))
    assert stopped.stopped and stopped.steps == k and ckpts == [k]
    resume_point = latest_checkpoint(out)
    assert resume_point == out / f"checkpoint-{k}" == stopped.adapter_dir
    for step, m in first.items():
        for key in keys:
            assert m[key] == pytest.approx(reference[step][key], rel=1e-3), (step, key)

    # 2. a new call resumes from it and finishes: same losses, margins and schedule
    resumed: dict[int, dict] = {}
    ckpts.clear()
    result = train(TrainRequest(
        spec, ROWS, out,
        on_metrics=lambda m: resumed.__setitem__(m["step"], m),
        on_checkpoint=lambda p, s: ckpts.append(s),
        resume_from=resume_point,
    ))
    assert result.steps == n and not result.stopped and ckpts == [n]
    assert sorted(resumed) == list(range(k + 1, n + 1))
    for step, m in resumed.items():
        for key in keys:
            assert m[key] == pytest.approx(reference[step][key], rel=1e-3), (step, key)
    assert result.final_loss == pytest.approx(full.final_loss, rel=1e-3)
    assert result.first_loss == full.first_loss  # carried over from the checkpoint
    state = json.loads((result.adapter_dir / TRAINER_STATE).read_text())
    assert [m["step"] for m in state["log_history"]] == list(range(1, n + 1))
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
    # keep_last_checkpoints=1: checkpoint-k went once checkpoint-n was complete
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{n}"]

    # 3. resuming the finished run trains nothing; other data is refused
    again = train(TrainRequest(spec, ROWS, out, resume_from=result.adapter_dir))
    assert again.steps == n and not again.stopped and again.adapter_dir == result.adapter_dir
    with pytest.raises(CheckpointError, match="different data"):
        train(TrainRequest(spec, ROWS[:8], out, resume_from=result.adapter_dir))


def test_rejects_rows_without_preference_fields(tiny, tmp_path):
    with pytest.raises(ValueError, match="chosen"):
        train(TrainRequest(
            _spec(tiny, "dpo"), [{"prompt": "a", "completion": "b"}], tmp_path / "out"
        ))
    with pytest.raises(ValueError, match="dpo and orpo"):
        preference.train(TrainRequest(_spec(tiny, "sft"), ROWS, tmp_path / "out"))

"""The SFT recipe, with real training steps on a tiny Llama."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.methods import UnsupportedOnHardware
from services.trainer.recipes import TrainRequest, train

ROWS = [
    {"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
    for w in ("apple", "river", "stone", "cat", "dog", "moon")
]
METRIC_FIELDS = {"step", "max_steps", "loss", "learning_rate", "tokens_per_s", "samples_per_s",
                 "epoch", "grad_norm", "memory_bytes", "eta_s"}


def make_spec(model_dir: str, dropout: float = 0.1, **hp) -> JobSpec:
    hyper = {"max_steps": 30, "batch_size": 4, "learning_rate": 1e-2, "seed": 7, "log_every": 5}
    hyper.update(hp)
    return JobSpec(
        base_model=model_dir,
        dataset="unit",
        lora={"r": 8, "alpha": 16, "dropout": dropout},
        hyperparameters=hyper,
    )


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """One 30-step run with a checkpoint every 10 steps, recording the callbacks."""
    out = tmp_path_factory.mktemp("run")
    metrics, checkpoints = [], []

    def on_checkpoint(path: Path, step: int) -> None:
        assert (path / "manifest.json").is_file()  # complete before anyone is told
        checkpoints.append((path, step))

    result = train(TrainRequest(
        make_spec(model_dir, checkpoint_every=10), ROWS, out,
        on_metrics=metrics.append, on_checkpoint=on_checkpoint,
    ))
    return result, metrics, checkpoints, out


@pytest.mark.slow
def test_loss_falls(run):
    result, metrics, _, _ = run
    assert result.steps == 30 and not result.stopped
    assert math.isfinite(result.first_loss)
    assert result.final_loss < 0.8 * result.first_loss
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert result.tokens_seen > 30 * 4 * 5  # every batch has at least 5 real tokens per row


@pytest.mark.slow
def test_metrics_reported_every_log_every_steps(run):
    _, metrics, _, _ = run
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    for m in metrics:
        assert set(m) >= METRIC_FIELDS
        assert m["max_steps"] == 30
        assert m["tokens_per_s"] > 0 and m["samples_per_s"] > 0
        assert m["grad_norm"] > 0 and m["memory_bytes"] > 10_000_000 and m["eta_s"] >= 0
        assert m["epoch"] == pytest.approx(m["step"] * 4 / len(ROWS))
    lrs = [m["learning_rate"] for m in metrics]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] <= 1e-2  # linear decay


@pytest.mark.slow
def test_checkpoints_manifest_last_and_hashes_match(run):
    result, _, checkpoints, out = run
    assert [s for _, s in checkpoints] == [10, 20, 30]
    assert result.adapter_dir == out / "checkpoint-30" == latest_checkpoint(out)
    for path, step in checkpoints:
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["step"] == step
        listed = {f["path"] for f in manifest["files"]}
        on_disk = {p.name for p in path.iterdir() if p.name != "manifest.json"}
        assert listed == on_disk
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
                "trainer_state.json", "rng.safetensors", "scheduler.json"} <= listed
        sched = json.loads((path / "scheduler.json").read_text())["scheduler"]
        assert sched["last_epoch"] == step
        for f in manifest["files"]:
            data = (path / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
            assert len(data) == f["size"]
        newest = max((path / f).stat().st_mtime_ns for f in listed)
        assert (path / "manifest.json").stat().st_mtime_ns >= newest
        assert not [p for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pkl", ".pth"}]
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["step"] == step and state["samples_seen"] == step * 4
        assert state["spec"]["hyperparameters"]["seed"] == 7


@pytest.mark.slow
def test_verify_checkpoint_detects_tampering(run, tmp_path):
    import shutil

    _, _, checkpoints, _ = run
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints[0][0], copy)
    assert verify_checkpoint(copy)["step"] == 10
    blob = bytearray((copy / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (copy / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        verify_checkpoint(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(copy)


@pytest.mark.slow
def test_adapter_loads_with_peft_and_changes_the_model(run, model_dir):
    result, _, _, _ = run
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 60, 70, 80, 90]])
    with torch.no_grad():
        before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert any("q_proj" in k for k in saved) and not any("gate_proj" in k for k in saved)
    live = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        match = [v for k, v in live.items() if k.replace(".default", "") == key]
        assert match and torch.equal(match[0], value)
    with torch.no_grad():
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.slow
def test_should_stop_stops_early_with_a_checkpoint(model_dir, tmp_path):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3  # allow 3 steps

    result = train(TrainRequest(make_spec(model_dir), ROWS, tmp_path, should_stop=should_stop))
    assert result.stopped and result.steps == 3
    assert result.adapter_dir == tmp_path / "checkpoint-3"
    assert verify_checkpoint(result.adapter_dir)["step"] == 3


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(model_dir, tmp_path):
    spec = make_spec(model_dir, max_steps=10, checkpoint_every=5, log_every=1)
    full = train(TrainRequest(spec, ROWS, tmp_path / "full"))
    resumed_metrics = []
    resumed = train(TrainRequest(
        spec, ROWS, tmp_path / "resumed",
        resume_from=tmp_path / "full" / "checkpoint-5", on_metrics=resumed_metrics.append,
    ))
    assert [m["step"] for m in resumed_metrics] == [6, 7, 8, 9, 10]
    assert resumed.steps == 10 and resumed.first_loss == full.first_loss
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_rows_without_learnable_tokens_are_rejected(model_dir, tmp_path):
    rows = [{"prompt": "a very long prompt " * 20, "completion": " x"}]
    with pytest.raises(ValueError, match="max_seq_length=16"):
        train(TrainRequest(make_spec(model_dir, max_seq_length=16), rows, tmp_path))


@pytest.mark.slow
def test_gradient_accumulation_matches_the_larger_batch(model_dir, tmp_path):
    """batch 4 x 1 micro-batch == batch 2 x 2 micro-batches: the loss is normalized by the
    learned tokens of the whole optimizer step, not averaged per micro-batch."""
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        metrics = []
        spec = make_spec(model_dir, dropout=0.0, max_steps=4, batch_size=bs,
                         gradient_accumulation_steps=accum, log_every=1)
        train(TrainRequest(spec, ROWS, tmp_path / f"{bs}x{accum}", on_metrics=metrics.append))
        runs.append(metrics)
    a, b = runs
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_eval_loss_and_early_stopping(model_dir, tmp_path):
    metrics = []
    spec = make_spec(model_dir, max_steps=30, log_every=5, eval_every=2,
                     early_stopping={"patience": 2, "min_delta": 100.0})
    result = train(TrainRequest(spec, ROWS, tmp_path, eval_rows=ROWS[:3],
                                on_metrics=metrics.append))
    # the first evaluation sets the best; two more without a 100.0 improvement stop the run
    assert result.steps == 6 and not result.stopped
    assert result.stop_reason.startswith("early_stopping") and "best" in result.stop_reason
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    assert [s for s, _ in evals] == [2, 4, 6]  # reported at each evaluation, not only log_every
    assert all(math.isfinite(v) and v > 0 for _, v in evals)
    assert result.eval_loss == evals[-1][1]
    assert result.adapter_dir == tmp_path / "checkpoint-6"
    with pytest.raises(ValueError, match="eval_rows"):
        train(TrainRequest(make_spec(model_dir, eval_every=2), ROWS, tmp_path / "x"))


@pytest.mark.slow
def test_keep_last_checkpoints(model_dir, tmp_path):
    seen = []
    spec = make_spec(model_dir, max_steps=6, checkpoint_every=2, keep_last_checkpoints=2)
    train(TrainRequest(spec, ROWS, tmp_path, on_checkpoint=lambda p, s: seen.append(s)))
    assert seen == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_adamw_8bit_trains_and_resumes_exactly(model_dir, tmp_path):
    spec = make_spec(model_dir, max_steps=6, checkpoint_every=3, optimizer="adamw_8bit",
                     log_every=1)
    full = train(TrainRequest(spec, ROWS, tmp_path / "full"))
    opt = load_file(str(tmp_path / "full" / "checkpoint-3" / "optimizer.safetensors"))
    # bitsandbytes state (state1/state2); tensors under its min_8bit_size (4096) stay 32-bit
    assert any(k.endswith("/state1") for k in opt) and any(k.endswith("/state2") for k in opt)
    resumed = train(TrainRequest(spec, ROWS, tmp_path / "resumed",
                                 resume_from=tmp_path / "full" / "checkpoint-3"))
    assert math.isfinite(full.final_loss) and full.final_loss < full.first_loss
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5)


@pytest.mark.slow
def test_packing_trains_on_packed_rows(model_dir, tmp_path):
    metrics = []
    spec = make_spec(model_dir, max_steps=4, packing=True, batch_size=1, max_seq_length=64,
                     log_every=1)
    result = train(TrainRequest(spec, ROWS, tmp_path, on_metrics=metrics.append))
    assert result.steps == 4 and math.isfinite(result.final_loss)
    state = json.loads((result.adapter_dir / "trainer_state.json").read_text())
    assert state["recipe"]["num_units"] < len(ROWS)  # several examples per packed row


def test_gpu_only_settings_are_refused_on_cpu_before_any_work(model_dir, tmp_path):
    base = make_spec(model_dir).model_dump()
    for spec in (
        JobSpec.model_validate({**base, "precision": "fp16"}),
        make_spec(model_dir, optimizer="paged_adamw_8bit"),
    ):
        with pytest.raises(UnsupportedOnHardware, match="CUDA|GPU"):
            train(TrainRequest(spec, ROWS, tmp_path / "out"))
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_trains_like_the_full_logits(model_dir, tmp_path, monkeypatch, method):
    """The recipe's loss goes through the output head in chunks (llmstudio.ml.loss); one step
    of it gives the loss, gradient norm and weights of the full-logits path."""
    import llmstudio.ml.loss as loss_module

    spec = JobSpec.model_validate({
        **make_spec(model_dir, dropout=0.0, max_steps=1, log_every=1).model_dump(),
        "method": method,
    })
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    chunk_calls = []
    chunked_lm_loss_sum = loss_module.chunked_lm_loss_sum

    def counting(*args, **kwargs):
        chunk_calls.append(1)
        return chunked_lm_loss_sum(*args, **kwargs)

    runs = {}
    for path in ("chunked", "full_logits"):
        if path == "full_logits":  # no decoder / head split: CausalLMLossSum takes the logits
            monkeypatch.setattr(loss_module, "decoder_and_head", lambda model: None)
        monkeypatch.setattr(loss_module, "chunked_lm_loss_sum", counting)
        chunk_calls.clear()
        metrics = []
        result = train(TrainRequest(spec, ROWS, tmp_path / path, on_metrics=metrics.append))
        runs[path] = (result, metrics[0], load_file(str(result.adapter_dir / weights)),
                      len(chunk_calls))
    (_, chunked, w_chunked, calls), (_, full, w_full, no_calls) = runs.values()
    assert calls > 0 and no_calls == 0
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert chunked["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    # By norm: AdamW's first update is lr * g / (|g| + eps), ill-conditioned element by element
    # where g is near 0 (a summation order moves it by up to lr); one wrong element moves the
    # norm of the difference by lr = 1e-2, far above this bound
    for key in w_full:
        diff = (w_chunked[key] - w_full[key]).norm()
        assert diff <= 1e-5 * w_full[key].norm() + 1e-6, key

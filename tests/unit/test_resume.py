"""A training process killed (SIGKILL) after its step-k checkpoint, resumed in a new process from
the newest complete checkpoint, reaches the same loss at step N as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import latest_checkpoint, verify_checkpoint
from llmstudio.ml.tiny import build_tiny_model
from services.trainer.recipes import TrainRequest, train

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"prompt": f"say {w} twice:", "completion": f" {w} {w}"}
    for w in ("apple", "river", "stone", "cat", "dog", "moon", "sun")
]
N, K = 12, 4

# The child: train (optionally resuming from the newest complete checkpoint), slowly enough that
# the parent can kill it between checkpoints; append every step's loss to a JSON-lines file.
CHILD = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import latest_checkpoint
from services.trainer.recipes import TrainRequest, train
spec_json, rows_json, out, log, resume, delay = sys.argv[1:7]
spec = JobSpec.model_validate_json(Path(spec_json).read_text())
rows = json.loads(Path(rows_json).read_text())
def on_metrics(m):
    with open(log, "a") as f:
        f.write(json.dumps({"step": m["step"], "loss": m["loss"]}) + "\\n")
    time.sleep(float(delay))
start = latest_checkpoint(Path(out)) if resume == "1" else None
r = train(TrainRequest(spec, rows, Path(out), on_metrics=on_metrics, resume_from=start))
print(json.dumps({"resumed_from": str(start), "steps": r.steps, "final_loss": r.final_loss}))
"""


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # trains


def _child(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'libs'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def test_killed_run_resumes_to_the_same_loss(tmp_path):
    model_dir = str(build_tiny_model(tmp_path / "m"))
    spec = JobSpec(
        base_model=model_dir, dataset="unit",
        lora={"r": 8, "alpha": 16, "dropout": 0.2},  # dropout: the RNG state matters
        hyperparameters={"max_steps": N, "batch_size": 3, "learning_rate": 5e-3, "seed": 11,
                         "warmup_steps": 3,  # a non-trivial schedule to restore
                         "log_every": 1, "checkpoint_every": K},
    )
    spec_json, rows_json = tmp_path / "spec.json", tmp_path / "rows.json"
    spec_json.write_text(spec.model_dump_json())
    rows_json.write_text(json.dumps(ROWS))
    out, log1, log2 = tmp_path / "out", tmp_path / "first.jsonl", tmp_path / "second.jsonl"

    # 1. start training; SIGKILL it as soon as checkpoint-K is complete
    first = _child([str(spec_json), str(rows_json), str(out), str(log1), "0", "0.3"])
    deadline = time.monotonic() + 60
    while not (out / f"checkpoint-{K}" / "manifest.json").is_file():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    killed_at = max(_losses(log1))
    assert K <= killed_at < N  # really interrupted mid-run
    resume_point = latest_checkpoint(out)
    assert resume_point == out / f"checkpoint-{K}"
    verify_checkpoint(resume_point)

    # 2. a new process resumes from the newest complete checkpoint and finishes
    second = _child([str(spec_json), str(rows_json), str(out), str(log2), "1", "0"])
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == str(resume_point) and summary["steps"] == N
    resumed = _losses(log2)
    assert sorted(resumed) == list(range(K + 1, N + 1))

    # 3. the uninterrupted run, in this process
    reference: dict[int, float] = {}
    full = train(TrainRequest(spec, ROWS, tmp_path / "full",
                              on_metrics=lambda m: reference.__setitem__(m["step"], m["loss"])))
    assert full.steps == N
    # the killed process agreed with the reference up to where it got
    for step, loss in _losses(log1).items():
        assert loss == pytest.approx(reference[step], rel=1e-3)
    for step in range(K + 1, N + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-3), step
    assert summary["final_loss"] == pytest.approx(full.final_loss, rel=1e-3)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(out / f"checkpoint-{N}" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)

"""bf16 autocast vs fp32 training on this CPU: tokens/s and the loss curve of the demo recipe.

SmolLM2-135M-Instruct, the demo's job (libs/llmstudio/demo_data.py: LoRA r16 on the attention
projections, batch 8, max length 64, lr 1e-3, 80 steps) on the demo's word-reversal rows,
through the trainer's SFT recipe (what a trainer-worker runs). bf16 is autocast: weights,
gradients and AdamW state stay fp32, the matmuls run in bf16 (AVX-512 BF16 / AMX where the CPU
has them; elsewhere torch emulates bf16, ~25x slower than fp32).

Each precision trains in its own process (a fresh allocator and thread pool per run); the two
alternate, ROUNDS times, the order flipped every round. tokens/s counts the non-padding tokens
of the steps after the first WARMUP ones. The loss is the same every round (seeded), so it is
reported once per precision: at step STEPS, and as the mean of the last 10 steps.

value/baseline = bf16 tokens/s / fp32 tokens/s (median over rounds; min/median/max printed).
`converged` says whether bf16 ends where fp32 does: mean loss of the last 10 steps no more than
LOSS_SLACK above fp32's (nats per learned token; the task's loss falls from ~5 to ~0.01).

    .venv/bin/python -m bench.bf16                      # 4 rounds of 80 steps per precision
    LLMSTUDIO_BENCH_STEPS=20 LLMSTUDIO_BENCH_ROUNDS=2 .venv/bin/python -m bench.bf16  # quick
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import smollm2, write_result

STEPS = int(os.environ.get("LLMSTUDIO_BENCH_STEPS", "80"))
ROUNDS = int(os.environ.get("LLMSTUDIO_BENCH_ROUNDS", "4"))
WARMUP = min(3, STEPS - 1)
LOSS_SLACK = 0.05
TAIL = 10  # steps averaged for the end-of-run loss
PRECISIONS = ("fp32", "bf16")


def _spec(model_dir: str, precision: str):
    from llmstudio.demo_data import demo_job_spec
    from llmstudio.jobspec import JobSpec

    spec = demo_job_spec(model_dir, "bench", precision=precision)
    spec["hyperparameters"].update(max_steps=STEPS, checkpoint_every=0, log_every=1)
    return JobSpec.model_validate(spec)


def run_side(precision: str) -> dict:
    """One training run in this process: per-step loss, and tokens/s after the warm-up."""
    from llmstudio.demo_data import DEMO_TRAIN_ROWS, word_reversal_rows
    from services.trainer.recipes import TrainRequest, train

    rows = word_reversal_rows(DEMO_TRAIN_ROWS, seed=7)
    losses: dict[int, float] = {}
    timed = {"tokens": 0.0, "seconds": 0.0, "cpu_s": 0.0}
    last = [time.perf_counter(), time.process_time()]

    def on_metrics(m: dict) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        losses[m["step"]] = m["loss"]
        if m["step"] > WARMUP:  # log_every=1: this window is exactly this step
            seconds = now - last[0]
            timed["tokens"] += round(m["tokens_per_s"] * seconds)
            timed["seconds"] += seconds
            timed["cpu_s"] += cpu - last[1]
        last[:] = now, cpu

    with tempfile.TemporaryDirectory() as out:
        train(TrainRequest(_spec(str(smollm2()), precision), rows, Path(out),
                           on_metrics=on_metrics))
    return {"precision": precision, "tokens_per_s": timed["tokens"] / timed["seconds"],
            "cpu_ms_per_token": 1000 * timed["cpu_s"] / timed["tokens"],
            "losses": [losses[s] for s in sorted(losses)]}


def _in_process(precision: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "bench.bf16", "--side", precision, f.name],
                       check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(Path(f.name).read_text())


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main() -> dict:
    smollm2()
    rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    cpu: dict[str, list[float]] = {p: [] for p in PRECISIONS}  # less sensitive to other load
    losses: dict[str, list[float]] = {}
    for r in range(ROUNDS):  # alternate the order so drift hits both sides
        for precision in PRECISIONS if r % 2 == 0 else reversed(PRECISIONS):
            side = _in_process(precision)
            rates[precision].append(side["tokens_per_s"])
            cpu[precision].append(side["cpu_ms_per_token"])
            losses[precision] = side["losses"]
            print(f"round {r + 1} {precision} {side['tokens_per_s']:8.1f} tokens/s, "
                  f"{side['cpu_ms_per_token']:6.2f} CPU ms/token, "
                  f"loss at step {STEPS} {side['losses'][-1]:.4f}", flush=True)
    ratios = [b / f for b, f in zip(rates["bf16"], rates["fp32"], strict=True)]
    tail = {p: statistics.fmean(losses[p][-TAIL:]) for p in PRECISIONS}
    converged = tail["bf16"] <= tail["fp32"] + LOSS_SLACK
    print(f"{'':10s}{'min':>9s}{'median':>9s}{'max':>9s}{'loss@' + str(STEPS):>11s}"
          f"{'last ' + str(TAIL):>10s}")
    for p in PRECISIONS:
        s = _spread(rates[p])
        print(f"{p + ' tok/s':10s}{s['min']:9.1f}{s['median']:9.1f}{s['max']:9.1f}"
              f"{losses[p][-1]:11.4f}{tail[p]:10.4f}")
    s = _spread(ratios)
    print(f"{'bf16/fp32':10s}{s['min']:9.3f}{s['median']:9.3f}{s['max']:9.3f}"
          f"   converged: {converged}")
    cpu_ratio = statistics.median(cpu["fp32"]) / statistics.median(cpu["bf16"])
    print(f"CPU time per token, fp32/bf16 (medians): {cpu_ratio:.3f}")
    import torch

    from services.trainer.host import cpu_has_native_bf16

    return write_result(
        "bf16", value=statistics.median(rates["bf16"]),
        baseline=statistics.median(rates["fp32"]), unit="tokens/s",
        rounds=rates, ratio_spread=s, spread={p: _spread(rates[p]) for p in PRECISIONS},
        loss_at_step={p: losses[p][-1] for p in PRECISIONS}, step=STEPS,
        loss_last_steps_mean=tail, converged=converged, loss_slack=LOSS_SLACK,
        cpu_ms_per_token={p: _spread(cpu[p]) for p in PRECISIONS}, cpu_time_ratio=cpu_ratio,
        loss_curve=losses, cpu_bf16_units=cpu_has_native_bf16(),
        threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--side"]:
        Path(sys.argv[3]).write_text(json.dumps(run_side(sys.argv[2])))
    else:
        main()

"""Peak training memory of full fine-tune vs LoRA vs QLoRA (4-bit NF4) on SmolLM2-135M.

Each method runs in its own fresh subprocess (`python -m bench.peft_memory --one METHOD`):
import torch/transformers/peft/bitsandbytes, record the process RSS (the baseline), then
`methods.load_for_training` + 3 AdamW steps at batch 8 x 128 tokens, fp32, on CPU. The figure is
peak RSS (getrusage ru_maxrss, the kernel's high-water mark) minus that baseline: weights,
gradients, optimizer state, activations and the load path's transient copies. A polling thread
also records the peak of anonymous memory (RssAnon: excludes file pages mapped from the
safetensors file) and the peak during loading alone.

value = QLoRA bytes, baseline = full fine-tune bytes, ratio = QLoRA / full (target <= 0.40);
LoRA / full is reported beside it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import SMOLLM2_DIR, smollm2, write_result

MODEL_DIR = SMOLLM2_DIR
METHODS = ("full", "lora", "qlora")
BATCH, SEQ, STEPS = 8, 128, 3


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Poller(threading.Thread):
    """Samples RSS and RssAnon every few ms; keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = self.peak_anon = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_rss = max(self.peak_rss, _status_kb("VmRSS"))
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))
            self._done.wait(0.005)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _one(method: str, gc: bool, steps: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import bitsandbytes  # noqa: F401 - imported before the baseline, like every other library
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from llmstudio.jobspec import JobSpec
    from llmstudio.ml.allocator import release_free_memory
    from llmstudio.ml.loss import CausalLMLossSum
    from services.trainer.methods import load_for_training

    torch.manual_seed(0)
    spec = JobSpec(
        base_model=str(MODEL_DIR), dataset="bench", method=method,
        hyperparameters={"max_steps": steps, "batch_size": BATCH, "max_seq_length": SEQ,
                         "learning_rate": 1e-4, "gradient_checkpointing": gc},
    )
    ids = torch.randint(0, 49152, (BATCH, SEQ))
    am = torch.ones_like(ids)

    base_rss = _status_kb("VmRSS") * 1024
    base_anon = _status_kb("RssAnon") * 1024
    poller = _Poller()
    poller.start()

    t0 = time.perf_counter()
    pm = load_for_training(spec, str(MODEL_DIR), torch.device("cpu"))
    release_free_memory()  # as the recipe does after loading (glibc's default allocator else)
    load_s = time.perf_counter() - t0
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after_load_rss = _status_kb("VmRSS") * 1024
    load_peak_anon = poller.peak_anon * 1024

    opt = torch.optim.AdamW([p for _, p in pm.trainable], lr=1e-4)
    loss_model = CausalLMLossSum(pm.model)  # the recipe's training loss, chunked
    losses = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        # The recipe's loss (llmstudio.ml.loss): decoder hidden states, then the output head on
        # labelled positions only, in checkpointed chunks.
        loss = loss_model(labels=ids, input_ids=ids, attention_mask=am) / (ids.numel() - len(ids))
        loss.backward()
        opt.step()
        pm.after_backward(step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        del loss
    train_s = time.perf_counter() - t0
    poller.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "peak_bytes": peak - base_rss,
        "peak_anon_bytes": max(poller.peak_anon * 1024 - base_anon, 0),
        "load_peak_bytes": load_peak - base_rss,
        "load_peak_anon_bytes": max(load_peak_anon - base_anon, 0),
        "after_load_bytes": after_load_rss - base_rss,
        "baseline_rss_bytes": base_rss,
        "num_trainable": pm.num_trainable,
        "num_total": pm.num_total,
        "load_s": load_s,
        "train_s": train_s,
        "losses": losses,
    }


def _run_one(method: str, gc: bool, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.peft_memory", "--one", method, "--steps", str(steps)]
        + (["--gc"] if gc else []),
        capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent),
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peft_memory --one {method} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(res: dict, gc: bool, steps: int) -> None:
    mib = 1024 * 1024
    full = res["full"]["peak_bytes"]
    print(f"SmolLM2-135M, fp32 on CPU, AdamW, batch {BATCH} x {SEQ}, {steps} steps, gradient "
          f"checkpointing {'on' if gc else 'off'}; MiB above the pre-load RSS")
    print(f"{'method':<8}{'peak RSS':>10}{'peak anon':>11}{'load peak':>11}"
          f"{'after load':>12}{'trainable':>13}{'/ full':>8}{'s/step':>8}")
    for m in METHODS:
        r = res[m]
        print(f"{m:<8}{r['peak_bytes'] / mib:>10.0f}{r['peak_anon_bytes'] / mib:>11.0f}"
              f"{r['load_peak_bytes'] / mib:>11.0f}{r['after_load_bytes'] / mib:>12.0f}"
              f"{r['num_trainable']:>13,}{r['peak_bytes'] / full:>8.2f}"
              f"{r['train_s'] / steps:>8.1f}")


def main(argv: list[str] | None = None) -> None:
    """Default (`make bench`): both configurations, each method in its own process. The headline
    (value / baseline) is the gradient-checkpointed run, the standard QLoRA setup; the run
    without checkpointing is reported beside it (there, at this model size, activations and
    the 49k-vocabulary logits dominate every method)."""
    import argparse


    ap = argparse.ArgumentParser(prog="bench.peft_memory")
    ap.add_argument("--configs", default="gc,nogc", help="comma list of gc / nogc")
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args(argv or [])
    smollm2()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    runs: dict[str, dict] = {}
    for cfg in configs:
        gc = cfg == "gc"
        runs[cfg] = {m: _run_one(m, gc, args.steps) for m in METHODS}
        _table(runs[cfg], gc, args.steps)
    head = runs.get("gc") or runs[configs[0]]
    full, lora, qlora = (head[m]["peak_bytes"] for m in METHODS)
    extra = {}
    for cfg, res in runs.items():
        f = res["full"]["peak_bytes"]
        extra[f"{cfg}_qlora_ratio"] = res["qlora"]["peak_bytes"] / f
        extra[f"{cfg}_lora_ratio"] = res["lora"]["peak_bytes"] / f
    result = write_result(
        "peft_memory", value=qlora, baseline=full, unit="bytes",
        lora=lora, lora_ratio=lora / full, target_ratio=0.40,
        headline_config="gc" if "gc" in runs else configs[0],
        batch=BATCH, seq_len=SEQ, steps=args.steps, model="SmolLM2-135M-Instruct",
        **extra, runs=runs,
    )
    print(f"headline ({result['headline_config']}): QLoRA / full = {result['ratio']:.2f} "
          f"(target <= 0.40); LoRA / full = {lora / full:.2f}; "
          + ", ".join(f"{k} = {v:.2f}" for k, v in extra.items()))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--one":
        steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else STEPS
        print(json.dumps(_one(sys.argv[2], "--gc" in sys.argv, steps)))
    else:
        main(sys.argv[1:])

"""A fine-tuning job through the platform vs the same training in one plain HF Trainer process.

Platform: the embedded stack (libs/llmstudio/local.py: nats-server and every service as
subprocesses, started once before the rounds, as a user's stack is) runs a 100-step LoRA job on
the tiny Llama, submitted with the SDK: wall time from `jobs.create` to the job's `succeeded`
status, and to its first metrics sample (step 1). The evaluation that follows a job is not part
of `succeeded`; the bench waits for it between rounds so it does not overlap the next one.

Baseline: one Python process started from scratch (process start -> exit) that imports
transformers + peft, tokenizes the same word-reversal rows with the same encoding, trains the
same LoRA (r16 on all seven projections, batch 16, max length 128, dynamic padding, lr 3e-3,
linear schedule, AdamW, grad-norm clip 1.0, 100 steps) with `transformers.Trainer`, and saves
the adapter. Both train in the precision the platform's `precision: auto` picks on this CPU.

The two alternate ROUNDS times (order flipped every round). value/baseline = platform wall /
HF Trainer wall (median over rounds; min/median/max printed). Done when <= 0.8.

    .venv/bin/python -m bench.job_overhead
    LLMSTUDIO_BENCH_ROUNDS=2 LLMSTUDIO_BENCH_STEPS=30 .venv/bin/python -m bench.job_overhead
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

from bench.common import write_result

STEPS = int(os.environ.get("LLMSTUDIO_BENCH_STEPS", "100"))
ROUNDS = int(os.environ.get("LLMSTUDIO_BENCH_ROUNDS", "4"))
ROWS, VALIDATION_ROWS = 640, 32
BATCH, SEQ, LR, RANK, ALPHA = 16, 128, 3e-3, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 0.8


def _spec(model_dir: Path, dataset_id: str) -> dict:
    return {
        "name": "bench-job-overhead", "base_model": str(model_dir), "dataset": dataset_id,
        "method": "lora",
        "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS},
        "hyperparameters": {"max_steps": STEPS, "batch_size": BATCH, "learning_rate": LR,
                            "max_seq_length": SEQ, "warmup_steps": 0, "max_grad_norm": 1.0,
                            "checkpoint_every": 0},
        "eval": {"max_samples": 8, "max_new_tokens": 8},
    }


def _auto_precision() -> str:
    """What `precision: auto` trains in on this machine's trainer-worker."""
    import torch

    from llmstudio.jobspec import JobSpec
    from services.trainer import methods

    spec = JobSpec(base_model="m", dataset="d")
    return methods.resolve_precision(spec, torch.device("cpu")).precision


# -- the platform side ----------------------------------------------------------------------


def run_job(client, model_dir: Path, dataset_id: str) -> dict:
    from llmstudio.client import job_status_name

    t0 = time.perf_counter()
    job = client.jobs.create(_spec(model_dir, dataset_id))
    first_step = status = None
    for update in client.jobs.watch(job.id, timeout=1800):
        if update.kind == "metrics" and first_step is None:
            first_step = time.perf_counter() - t0
        status = job_status_name(update.job.status)
    wall = time.perf_counter() - t0
    if status != "succeeded":
        raise SystemExit(f"job {job.id} ended {status}: {update.job.error}")

    def evaluated():  # let the follow-up evaluation finish before the next round starts
        return any(e.status in ("completed", "failed") for e in client.evaluations.list(job.id))

    deadline = time.monotonic() + 600
    while not evaluated() and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"wall_s": wall, "first_step_s": first_step}


# -- the baseline: one plain HF Trainer process ----------------------------------------------


def hf_trainer_main(model_dir: str, rows_file: str, out_dir: str, stamp_file: str) -> None:
    """The whole baseline process: import, tokenize, load, train, save the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llmstudio.ml.data import collate, encode_example, pad_id_of

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(rows_file).read_text().splitlines()]
    examples = [encode_example(tok, r, SEQ) for r in rows]
    pad = pad_id_of(tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA,
                                             lora_dropout=0.0, target_modules=TARGETS))

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                Path(stamp_file).write_text(str(time.time()))

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=42, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, bf16=_auto_precision() == "bf16",
    )
    Trainer(model=model, args=args, train_dataset=examples,
            data_collator=lambda b: collate(b, pad), callbacks=[FirstStep()]).train()
    model.save_pretrained(out_dir)


def run_hf_trainer(model_dir: Path, rows_file: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        stamp = Path(out) / "first_step"
        started, t0 = time.time(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.job_overhead", "--hf", str(model_dir),
                        str(rows_file), out, str(stamp)],
                       check=True, cwd=Path(__file__).resolve().parents[1],
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "first_step_s": float(stamp.read_text()) - started}


# -- the rounds ----------------------------------------------------------------------------


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main() -> dict:
    from llmstudio import local
    from llmstudio.client import Client
    from llmstudio.demo_data import word_reversal_rows
    from llmstudio.ml.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "stack"
        model_dir = build_tiny_model(data_dir / "models" / "tiny")
        rows = word_reversal_rows(ROWS + VALIDATION_ROWS, seed=7)
        dataset_file = Path(tmp) / "reverse.jsonl"
        dataset_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train_file = Path(tmp) / "train.jsonl"  # the baseline trains on the same row count
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:ROWS]))
        local.up(data_dir, timeout=300)
        try:
            client = Client(data_dir=data_dir)
            ds = client.datasets.push(dataset_file, name="reverse",
                                      validation_fraction=VALIDATION_ROWS / len(rows))
            sides = {"platform": lambda: run_job(client, model_dir, ds.id),
                     "hf_trainer": lambda: run_hf_trainer(model_dir, train_file)}
            runs: dict[str, list[dict]] = {name: [] for name in sides}
            for r in range(ROUNDS):  # alternate the order so drift hits both sides
                for name in sides if r % 2 == 0 else reversed(list(sides)):
                    run = sides[name]()
                    runs[name].append(run)
                    print(f"round {r + 1} {name:10s} wall {run['wall_s']:6.1f} s, first step "
                          f"{run['first_step_s']:5.1f} s", flush=True)
            client.close()
        finally:
            local.down(data_dir)
    walls = {n: [x["wall_s"] for x in v] for n, v in runs.items()}
    firsts = {n: [x["first_step_s"] for x in v] for n, v in runs.items()}
    ratios = [p / h for p, h in zip(walls["platform"], walls["hf_trainer"], strict=True)]
    print(f"{'':22s}{'min':>8s}{'median':>8s}{'max':>8s}")
    for n in runs:
        for what, xs in (("wall s", walls[n]), ("first step s", firsts[n])):
            s = _spread(xs)
            print(f"{n + ' ' + what:22s}{s['min']:8.1f}{s['median']:8.1f}{s['max']:8.1f}")
    s = _spread(ratios)
    print(f"{'platform/HF wall':22s}{s['min']:8.3f}{s['median']:8.3f}{s['max']:8.3f}"
          f"   (done when <= {TARGET_RATIO})")
    return write_result(
        "job_overhead", value=statistics.median(walls["platform"]),
        baseline=statistics.median(walls["hf_trainer"]), unit="s",
        wall_s={n: _spread(v) for n, v in walls.items()},
        first_step_s={n: _spread(v) for n, v in firsts.items()},
        ratio_spread=s, rounds=runs, steps=STEPS, batch=BATCH, seq=SEQ, lora_r=RANK,
        precision=_auto_precision(), target_ratio=TARGET_RATIO,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hf"]:
        hf_trainer_main(*sys.argv[2:6])
    else:
        main()

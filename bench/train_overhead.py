"""Training overhead: tokens/s of the trainer's SFT recipe (services.trainer.recipes.sft,
what a trainer-worker runs) vs a plain transformers Trainer + peft script, same model, data and
hyperparameters, same run.

SmolLM2-135M-Instruct (fp32), LoRA r16 on the attention projections, batch 8, every example
exactly 64 tokens, fused AdamW (both sides' default), linear schedule, grad-norm clip 1.0, fp32
on CPU. Each side runs
2 warm-up steps then TIMED_STEPS timed ones (no evaluation, no checkpoint inside the timed
window); the two sides alternate, ROUNDS times, and each side's best round counts (these
machines are shared and noisy). value/baseline = recipe tokens/s / Trainer tokens/s.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SMOLLM2_DIR, smollm2, write_result

MODEL = Path(os.environ.get("LLMSTUDIO_BENCH_MODEL", SMOLLM2_DIR))
BATCH, SEQ = 8, 64
# A step of this model takes seconds on a CPU: shorten a run on a busy machine with
# LLMSTUDIO_BENCH_STEPS=<timed steps> (and LLMSTUDIO_BENCH_ROUNDS).
WARMUP = int(os.environ.get("LLMSTUDIO_BENCH_WARMUP", "2"))
TIMED_STEPS = int(os.environ.get("LLMSTUDIO_BENCH_STEPS", "15"))
ROUNDS = int(os.environ.get("LLMSTUDIO_BENCH_ROUNDS", "2"))
LR, RANK, ALPHA, DROPOUT, SEED = 1e-4, 16, 32, 0.05, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = ("apple river stone cat dog moon sun tree bird fish rain snow fire wind road ship "
         "cloud leaf sand star").split()


def _rows() -> list[dict]:
    """Rows long enough to fill 64 tokens after truncation: every example is exactly SEQ."""
    rows = []
    for i in range(64):
        ws = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(60)]
        rows.append({"prompt": f"Repeat: {ws[0]} {ws[1]}", "completion": " " + " ".join(ws)})
    return rows


def _spec():
    from llmstudio.jobspec import JobSpec

    return JobSpec(
        base_model=str(MODEL), dataset="bench", method="lora",
        lora={"r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": TARGETS},
        hyperparameters={"max_steps": WARMUP + TIMED_STEPS, "batch_size": BATCH,
                         "learning_rate": LR, "max_seq_length": SEQ, "seed": SEED,
                         "log_every": 1, "checkpoint_every": 0, "max_grad_norm": 1.0},
    )


def run_recipe(rows: list[dict]) -> float:
    from services.trainer.recipes import TrainRequest, train

    stamps: dict[int, float] = {}

    def on_metrics(m: dict) -> None:
        stamps[m["step"]] = time.perf_counter()
        print(f"  recipe step {m['step']} {time.perf_counter():.1f}", flush=True)

    with tempfile.TemporaryDirectory() as out:
        train(TrainRequest(_spec(), rows, Path(out), on_metrics=on_metrics))
    elapsed = stamps[WARMUP + TIMED_STEPS] - stamps[WARMUP]
    return TIMED_STEPS * BATCH * SEQ / elapsed


def run_hf_trainer(rows: list[dict]) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llmstudio.ml.data import collate, encode_example, pad_id_of

    tok = AutoTokenizer.from_pretrained(MODEL)
    examples = [encode_example(tok, r, SEQ) for r in rows]
    pad = pad_id_of(tok)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA,
                                             lora_dropout=DROPOUT, target_modules=TARGETS))
    stamps: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps[state.global_step] = time.perf_counter()
            print(f"  trainer step {state.global_step} {time.perf_counter():.1f}", flush=True)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=WARMUP + TIMED_STEPS,
            learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, seed=SEED, report_to="none",
            save_strategy="no", eval_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=examples,
                          data_collator=lambda b: collate(b, pad), callbacks=[Clock()])
        trainer.train()
    elapsed = stamps[WARMUP + TIMED_STEPS] - stamps[WARMUP]
    return TIMED_STEPS * BATCH * SEQ / elapsed


def main() -> dict:
    if MODEL == SMOLLM2_DIR:
        smollm2()
    elif not (MODEL / "config.json").is_file():
        raise SystemExit(f"LLMSTUDIO_BENCH_MODEL={MODEL}: no config.json there")
    rows = _rows()
    from transformers import AutoTokenizer

    from llmstudio.ml.data import encode_example

    tok = AutoTokenizer.from_pretrained(MODEL)
    lengths = {len(encode_example(tok, r, SEQ)["input_ids"]) for r in rows}
    assert lengths == {SEQ}, f"examples must all be {SEQ} tokens, got {lengths}"
    ours, theirs = [], []
    for r in range(ROUNDS):  # alternate the order so drift hits both sides
        order = (("recipe", run_recipe), ("hf", run_hf_trainer))
        for name, fn in order if r % 2 == 0 else reversed(order):
            rate = fn(rows)
            (ours if name == "recipe" else theirs).append(rate)
            print(f"round {r + 1} {name:7s} {rate:9.1f} tokens/s", flush=True)
    value, baseline = max(ours), max(theirs)
    print(f"{'':8s}{'recipe':>12s}{'HF Trainer':>12s}{'ratio':>8s}")
    print(f"{'tok/s':8s}{value:12.1f}{baseline:12.1f}{value / baseline:8.3f}")
    return write_result(
        "train_overhead", value=value, baseline=baseline, unit="tokens/s",
        rounds={"recipe": ours, "hf_trainer": theirs}, batch=BATCH, seq=SEQ,
        timed_steps=TIMED_STEPS, warmup_steps=WARMUP, lora_r=RANK, threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()

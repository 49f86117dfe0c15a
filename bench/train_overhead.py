"""Training overhead: tokens/s of the trainer's SFT recipe (services.trainer.recipes.sft, what a
trainer-worker runs) vs a plain transformers Trainer + peft script doing the same training.

Two configurations (LLMSTUDIO_BENCH_CONFIGS=smollm2,tiny picks them):

- smollm2: SmolLM2-135M-Instruct, LoRA r16 (alpha 32, dropout 0.05) on q/k/v/o, batch 8, every
  example exactly 64 tokens. Result: bench/results/train_overhead.json.
- tiny: the tiny Llama of llmstudio.ml.tiny at hidden 256 x 8 layers (4.7M parameters outside
  the embedding), LoRA r16 (alpha 32, no dropout) on all seven projections, batch 16, max length
  128, the demo's word-reversal rows (about 25 tokens each) with dynamic padding (each batch
  padded to its longest row): the configuration where HF Trainer and LLaMA-Factory measure the
  same. Result: bench/results/train_overhead_tiny.json.

A fair comparison: both sides train the same examples in the same order (the recipe's seeded
stream; the Trainer gets that sequence with sequential sampling), so they see the same tokens
(checked: equal token counts and the same step-1 loss); fp32 on CPU, fused AdamW, lr 1e-4 with
a linear decay and no warmup, no weight decay, grad-norm clip 1.0, no gradient checkpointing,
both log the loss every step, no evaluation and no checkpoint inside the timed window. The
recipe keeps what makes it the recipe (its chunked loss, its metrics). Each side runs in its own
process (`python -m bench.train_overhead --side recipe|hf --config NAME`), so neither inherits
the other's allocator or thread settings: WARMUP steps, then TIMED steps timed from the end of
the last warm-up step to the end of the last step. The sides alternate for ROUNDS rounds (the
first side alternates too). Reported per side: min / median / max tokens/s (non-padding tokens);
value / baseline = the medians, with the spread of the per-round ratio beside them.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import smollm2, write_result

ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = ROOT / ".llmstudio" / "models" / "tiny-llama-256x8"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "smollm2": {"result": "train_overhead", "batch": 8, "max_len": 64, "targets": ATTENTION,
                "dropout": 0.05, "warmup": 2, "timed": 10},
    "tiny": {"result": "train_overhead_tiny", "batch": 16, "max_len": 128, "targets": ALL_LINEAR,
             "dropout": 0.0, "warmup": 3, "timed": 40},
}
LR, RANK, ALPHA, SEED = 1e-4, 16, 32, 0
# Shorter runs on a busy machine: LLMSTUDIO_BENCH_STEPS=<timed steps>, LLMSTUDIO_BENCH_ROUNDS.
ROUNDS = int(os.environ.get("LLMSTUDIO_BENCH_ROUNDS", "4"))
WORDS = ("apple river stone cat dog moon sun tree bird fish rain snow fire wind road ship "
         "cloud leaf sand star").split()


def _steps(cfg: dict) -> tuple[int, int]:
    timed = int(os.environ.get("LLMSTUDIO_BENCH_STEPS", cfg["timed"]))
    return int(os.environ.get("LLMSTUDIO_BENCH_WARMUP", cfg["warmup"])), timed


def _model_dir(name: str) -> Path:
    if name == "smollm2":
        return smollm2()
    from llmstudio.ml.tiny import build_tiny_model

    return build_tiny_model(TINY_DIR, hidden=256, layers=8)


def _rows(name: str) -> list[dict]:
    if name == "tiny":
        from llmstudio.demo_data import DEMO_TRAIN_ROWS, word_reversal_rows

        return word_reversal_rows(DEMO_TRAIN_ROWS, SEED)
    # long enough to fill 64 tokens after truncation: every example is exactly 64 tokens
    return [{"prompt": f"Repeat: {WORDS[i % 20]} {WORDS[(i + 1) % 20]}",
             "completion": " " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60))}
            for i in range(64)]


def _examples(tokenizer, rows: list[dict], max_len: int) -> list[dict]:
    """The recipe's encoding and filtering (rows with nothing to learn are dropped)."""
    from llmstudio.ml.data import count_learned_tokens, encode_example

    examples = [encode_example(tokenizer, r, max_len) for r in rows]
    return [ex for ex in examples if count_learned_tokens(ex) > 0]


def _order(num_examples: int, count: int) -> list[int]:
    """The first `count` example indices of the recipe's seeded stream."""
    from services.trainer.recipes.sft import _example_stream

    stream = _example_stream(num_examples, SEED)
    return [next(stream) for _ in range(count)]


def _timed_tokens(examples: list[dict], batch: int, warmup: int, timed: int) -> int:
    order = _order(len(examples), (warmup + timed) * batch)
    return sum(len(examples[i]["input_ids"]) for i in order[warmup * batch:])


# --------------------------------------------------------------------------------------------
# the two sides, each in its own process


def run_recipe(name: str) -> dict:
    from transformers import AutoTokenizer

    from llmstudio.jobspec import JobSpec
    from services.trainer.recipes import TrainRequest, train

    cfg, model = CONFIGS[name], _model_dir(name)
    warmup, timed = _steps(cfg)
    spec = JobSpec(
        base_model=str(model), dataset="bench", method="lora", precision="fp32",
        lora={"r": RANK, "alpha": ALPHA, "dropout": cfg["dropout"],
              "target_modules": cfg["targets"]},
        hyperparameters={"max_steps": warmup + timed, "batch_size": cfg["batch"],
                         "learning_rate": LR, "warmup_steps": 0, "weight_decay": 0.0,
                         "max_seq_length": cfg["max_len"], "seed": SEED, "log_every": 1,
                         "checkpoint_every": 0, "max_grad_norm": 1.0, "optimizer": "adamw"},
    )
    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}

    def on_metrics(m: dict) -> None:
        stamps[m["step"]] = time.perf_counter()
        losses[m["step"]] = m["loss"]

    rows = _rows(name)
    with tempfile.TemporaryDirectory() as out:
        train(TrainRequest(spec, rows, Path(out), on_metrics=on_metrics))
    examples = _examples(AutoTokenizer.from_pretrained(model), rows, cfg["max_len"])
    return _side_result(stamps, losses[1], _timed_tokens(examples, cfg["batch"], warmup, timed),
                        warmup, timed)


def run_hf_trainer(name: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llmstudio.ml.data import collate, pad_id_of

    cfg, model_dir = CONFIGS[name], _model_dir(name)
    warmup, timed = _steps(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = _examples(tok, _rows(name), cfg["max_len"])
    sequence = [examples[i] for i in _order(len(examples), (warmup + timed) * cfg["batch"])]
    pad = pad_id_of(tok)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=cfg["dropout"],
        target_modules=cfg["targets"]))
    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg["batch"],
            max_steps=warmup + timed, learning_rate=LR, lr_scheduler_type="linear",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
            seed=SEED, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="steps", logging_steps=1, use_cpu=True,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=sequence,
                          data_collator=lambda b: collate(b, pad), callbacks=[Clock()])
        trainer.train()
    return _side_result(stamps, losses[1], _timed_tokens(examples, cfg["batch"], warmup, timed),
                        warmup, timed)


def _side_result(stamps: dict[int, float], first_loss: float, tokens: int, warmup: int,
                 timed: int) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = stamps[warmup + timed] - stamps[warmup]
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "elapsed_s": elapsed,
            "first_loss": first_loss, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "user_s": usage.ru_utime, "system_s": usage.ru_stime}


SIDES = {"recipe": run_recipe, "hf": run_hf_trainer}


def _run_side(side: str, name: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.train_overhead", "--side", side, "--config", name],
        capture_output=True, text=True, env=env, cwd=str(ROOT), check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"train_overhead --side {side} --config {name} failed:\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# the comparison


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def compare(name: str) -> dict:
    _model_dir(name)  # built or converted once, before any timed process
    runs: dict[str, list[dict]] = {"recipe": [], "hf": []}
    for r in range(ROUNDS):  # alternate which side goes first, so drift hits both
        for side in ("recipe", "hf") if r % 2 == 0 else ("hf", "recipe"):
            res = _run_side(side, name)
            runs[side].append(res)
            print(f"{name} round {r + 1} {side:7s} {res['tokens_per_s']:9.1f} tokens/s  "
                  f"peak RSS {res['peak_rss_bytes'] / 2**20:6.0f} MiB  "
                  f"system {res['system_s']:5.1f} s", flush=True)
    ours, theirs = runs["recipe"][0], runs["hf"][0]
    if ours["tokens"] != theirs["tokens"]:
        raise RuntimeError(f"unfair: recipe timed {ours['tokens']} tokens, HF {theirs['tokens']}")
    if abs(ours["first_loss"] - theirs["first_loss"]) > 1e-3 * abs(theirs["first_loss"]):
        raise RuntimeError(f"unfair: step-1 loss {ours['first_loss']} vs {theirs['first_loss']}")
    rate = {s: [r["tokens_per_s"] for r in runs[s]] for s in runs}
    ratios = [a / b for a, b in zip(rate["recipe"], rate["hf"], strict=True)]
    value, baseline = statistics.median(rate["recipe"]), statistics.median(rate["hf"])
    print(f"{name}: tokens/s min/median/max  recipe {_fmt(rate['recipe'])}  "
          f"HF Trainer {_fmt(rate['hf'])}  ratio {_fmt(ratios, 3)}")
    cfg = CONFIGS[name]
    warmup, timed = _steps(cfg)
    import torch

    return write_result(
        cfg["result"], value=value, baseline=baseline, unit="tokens/s", config=name,
        recipe=_spread(rate["recipe"]), hf_trainer=_spread(rate["hf"]),
        round_ratio=_spread(ratios), rounds=runs, batch=cfg["batch"], max_len=cfg["max_len"],
        target_modules=cfg["targets"], lora_r=RANK, timed_steps=timed, warmup_steps=warmup,
        threads=torch.get_num_threads(),
    )


def _fmt(xs: list[float], digits: int = 1) -> str:
    s = _spread(xs)
    return "/".join(f"{s[k]:.{digits}f}" for k in ("min", "median", "max"))


def main() -> dict:
    names = os.environ.get("LLMSTUDIO_BENCH_CONFIGS", "smollm2,tiny").split(",")
    results = {n: compare(n.strip()) for n in names if n.strip()}
    for n, res in results.items():
        print(f"{n}: recipe / HF Trainer = {res['ratio']:.3f} (per round "
              f"{_fmt([res['round_ratio'][k] for k in ('min', 'median', 'max')], 3)})")
    return results[next(iter(results))]


if __name__ == "__main__":
    if "--side" in sys.argv:
        args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=False))
        print(json.dumps(SIDES[args["--side"]](args["--config"])))
    else:
        main()

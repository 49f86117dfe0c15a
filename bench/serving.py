"""Serving speed on SmolLM2-135M-Instruct: the serving engine against plain `transformers`.

In one process, greedy, the same chat prompt for both (so both generate the same tokens):
- single stream: tokens/s and time to first token of `Engine.generate` vs `model.generate`
  (time to first token of the baseline: `generate(max_new_tokens=1)`); target ratio >= 0.9;
- 8 concurrent streams (one dynamic batch) vs the same 8 one after another on the engine:
  aggregate tokens/s; target >= 2x.
Each side runs in a fresh process of its own (`python -m bench.serving --one baseline|engine`):
torch's intra-op thread pools are per thread, and a pool left by one side's generate slows the
other's (measured: the engine at 14 instead of 25 tokens/s after a baseline run in the same
process), which a serving process, where only the engine computes, never sees. Each figure is
the median of REPEATS runs after a warm-up. value = engine single-stream tokens/s, baseline =
transformers tokens/s. Writes bench/results/serving.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.common import smollm2, write_result

NEW_TOKENS = 64
STREAMS = 8
REPEATS = 3
QUESTIONS = [f"Write a short story about a {thing} in the city." for thing in
             ("cat", "robot", "river", "baker", "clock", "violin", "train", "garden")]


def _transformers_run(model, ids: list[int]) -> tuple[float, float, int]:
    """(time to first token, total seconds, new tokens) of greedy generate."""
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    model.generate(prompt, do_sample=False, max_new_tokens=1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS)
    return ttft, time.perf_counter() - start, out.shape[1] - len(ids)


async def _engine_run(engine, ids: list[int]) -> tuple[float, float, int]:
    from services.serving.engine import SamplingParams

    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async for chunk in engine.generate(ids, SamplingParams(max_tokens=NEW_TOKENS,
                                                           temperature=0.0)):
        tokens += len(chunk.token_ids)
        if not ttft and chunk.token_ids:
            ttft = time.perf_counter() - start
    return ttft, time.perf_counter() - start, tokens


async def _engine_figures(model_dir: str, prompts: list[list[int]]) -> dict:
    from services.serving.engine import Engine

    engine = Engine(model_dir, max_batch_size=STREAMS, max_queue=4 * STREAMS)
    await engine.start()
    try:
        await _engine_run(engine, prompts[0])  # warm-up
        single = [await _engine_run(engine, prompts[0]) for _ in range(REPEATS)]
        sequential, concurrent = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            tokens = sum([(await _engine_run(engine, p))[2] for p in prompts])
            sequential.append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            runs = await asyncio.gather(*(_engine_run(engine, p) for p in prompts))
            concurrent.append(sum(r[2] for r in runs) / (time.perf_counter() - start))
    finally:
        await engine.close()
    return {
        "ttft_s": statistics.median(r[0] for r in single),
        "tokens_per_s": statistics.median(r[2] / r[1] for r in single),
        "tokens": single[0][2],
        "sequential_tokens_per_s": statistics.median(sequential),
        "concurrent_tokens_per_s": statistics.median(concurrent),
    }


def _prompts(model_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for q in QUESTIONS]


def _baseline_figures(model_dir: str, prompts: list[list[int]]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        _transformers_run(model, prompts[0])  # warm-up
        runs = [_transformers_run(model, prompts[0]) for _ in range(REPEATS)]
    return {"ttft_s": statistics.median(r[0] for r in runs),
            "tokens_per_s": statistics.median(r[2] / r[1] for r in runs), "tokens": runs[0][2]}


def _one(side: str) -> None:
    model_dir = str(smollm2())
    prompts = _prompts(model_dir)
    figures = (_baseline_figures(model_dir, prompts) if side == "baseline"
               else asyncio.run(_engine_figures(model_dir, prompts)))
    print(json.dumps(figures))


def _measure(side: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.serving", "--one", side], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    smollm2()  # converted once, before either side runs
    base, engine = _measure("baseline"), _measure("engine")
    base_tps, base_ttft = base["tokens_per_s"], base["ttft_s"]
    batching = engine["concurrent_tokens_per_s"] / engine["sequential_tokens_per_s"]
    rows = [
        ("single-stream tokens/s", engine["tokens_per_s"], base_tps, ">= 0.9x"),
        ("time to first token (s)", engine["ttft_s"], base_ttft, "(lower is better)"),
        (f"{STREAMS} streams, aggregate tokens/s", engine["concurrent_tokens_per_s"],
         engine["sequential_tokens_per_s"], ">= 2x (vs sequential)"),
    ]
    print(f"{'':<34}{'engine':>10}{'baseline':>10}{'ratio':>8}  target")
    for name, value, baseline, target in rows:
        print(f"{name:<34}{value:>10.3f}{baseline:>10.3f}{value / baseline:>8.2f}  {target}")
    write_result(
        "serving", value=engine["tokens_per_s"], baseline=base_tps, unit="tokens/s",
        target_ratio=0.9, new_tokens=NEW_TOKENS, engine_tokens=engine["tokens"],
        baseline_tokens=base["tokens"], ttft_s=engine["ttft_s"], baseline_ttft_s=base_ttft,
        ttft_ratio=engine["ttft_s"] / base_ttft,
        concurrent_tokens_per_s=engine["concurrent_tokens_per_s"],
        sequential_tokens_per_s=engine["sequential_tokens_per_s"],
        concurrency_ratio=batching, concurrency_target=2.0, streams=STREAMS,
        torch_threads=torch.get_num_threads(),
        device="cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        _one(sys.argv[2])
    else:
        main()

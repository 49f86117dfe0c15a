"""Sequence packing vs padding to the longest, LoRA training steps on a skewed-length dataset.

Both variants train on exactly the same examples (forward + backward + AdamW step, peft LoRA
r=8 on q_proj/v_proj, fp32, sdpa):

- baseline: batches of BATCH consecutive examples, each padded to its longest example
  (``llmstudio.ml.data.collate``, 2D attention mask);
- value: ``pack_examples`` bins (max_len MAX_LEN) collated by ``collate_packed`` and run ROWS
  rows per step (block-diagonal causal attention from position_ids, ``use_cache=False``).

ROWS = BATCH, so a packed step is never larger than the largest padded step (BATCH x MAX_LEN):
the gain is the padding not computed, not a bigger batch. Steps of the two variants are
interleaved so that machine load hits both alike. Metric: non-padding tokens / s (the same
tokens in both variants).

Model: SmolLM2-135M-Instruct (real weights, width and 49k vocab) cut to its first LAYERS
decoder layers: the full 30 layers run ~20 tokens/s for a training step on a shared 2-core CPU,
far too slow for a bench of a few minutes; packing changes only how many positions each layer
and the LM head process, so the ratio carries over. Falls back to the repo's tiny Llama when the
SmolLM2 directory is absent. Knobs: BENCH_PACKING_LAYERS, BENCH_PACKING_EXAMPLES.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.common import smollm2, write_result
from llmstudio.ml.data import IGNORE_INDEX, causal_lm_loss_sum, collate
from llmstudio.ml.packing import collate_packed, pack_examples

MAX_LEN = 256
BATCH = ROWS = 4
LAYERS = int(os.environ.get("BENCH_PACKING_LAYERS", "2"))
N_EXAMPLES = int(os.environ.get("BENCH_PACKING_EXAMPLES", "48"))
LONG_FRACTION = 0.1


def skewed_dataset(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Mostly short rows (lognormal around 24 tokens, 8..64), ~10% long ones (192..256)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < LONG_FRACTION:
            length = rng.randint(192, MAX_LEN)
        else:
            length = min(64, max(8, round(rng.lognormvariate(math.log(24), 0.35))))
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = length // 2
        out.append(
            {
                "input_ids": ids,
                "labels": [IGNORE_INDEX] * prompt + ids[prompt:],
                "attention_mask": [1] * length,
            }
        )
    return out


def _load_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from llmstudio.ml.smollm2 import smollm2_available

    hf_logging.set_verbosity_error()  # the cut layers are reported as "unexpected" keys
    if smollm2_available():
        name = f"SmolLM2-135M-Instruct, first {LAYERS} of 30 layers"
        model = AutoModelForCausalLM.from_pretrained(
            smollm2(), dtype=torch.float32, attn_implementation="sdpa", num_hidden_layers=LAYERS
        )
    else:
        from llmstudio.ml.tiny import build_tiny_model

        tiny = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", hidden=256, layers=4)
        name = "tiny Llama (hidden 256, 4 layers): SmolLM2 not found"
        model = AutoModelForCausalLM.from_pretrained(
            tiny, dtype=torch.float32, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    return name, model


def _step(model, opt, batch: dict[str, torch.Tensor]) -> None:
    labels = batch.pop("labels")
    out = model(**batch, use_cache=False)
    loss_sum, n = causal_lm_loss_sum(out.logits, labels)
    (loss_sum / max(n, 1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    torch.manual_seed(0)
    name, model = _load_model()
    vocab = model.get_input_embeddings().weight.shape[0]
    examples = skewed_dataset(N_EXAMPLES, vocab)
    real_tokens = sum(len(e["input_ids"]) for e in examples)

    t0 = time.perf_counter()
    bins = pack_examples(examples, MAX_LEN)
    pack_s = time.perf_counter() - t0
    padded = [collate(examples[i : i + BATCH], pad_id=0) for i in range(0, len(examples), BATCH)]
    packed = [
        collate_packed(examples, bins[i : i + ROWS], pad_id=0) for i in range(0, len(bins), ROWS)
    ]
    variants = {"padded": padded, "packed": packed}
    positions = {k: sum(b["input_ids"].numel() for b in v) for k, v in variants.items()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # warmup: one step of each variant at its largest shape (not timed)
    for v in variants.values():
        _step(model, opt, dict(max(v, key=lambda b: b["input_ids"].numel())))

    # interleave: always advance the variant that is further behind, as a fraction of its steps
    elapsed = dict.fromkeys(variants, 0.0)
    done = dict.fromkeys(variants, 0)
    while any(done[k] < len(v) for k, v in variants.items()):
        k = min(
            (k for k in variants if done[k] < len(variants[k])),
            key=lambda k: done[k] / len(variants[k]),
        )
        t0 = time.perf_counter()
        _step(model, opt, dict(variants[k][done[k]]))
        elapsed[k] += time.perf_counter() - t0
        done[k] += 1

    rate = {k: real_tokens / elapsed[k] for k in variants}
    r = write_result(
        "packing",
        value=rate["packed"],
        baseline=rate["padded"],
        unit="non-padding tokens/s",
        model=name,
        examples=N_EXAMPLES,
        non_padding_tokens=real_tokens,
        max_len=MAX_LEN,
        batch_examples=BATCH,
        packed_rows_per_step=ROWS,
        packed_rows=len(bins),
        steps={k: len(v) for k, v in variants.items()},
        positions_computed=positions,
        seconds=elapsed,
        pack_examples_s=pack_s,
        threads=torch.get_num_threads(),
    )
    print(
        f"model: {name}; {N_EXAMPLES} examples, {real_tokens} non-padding tokens, max_len {MAX_LEN}"
    )
    print(f"{'':<10}{'steps':>7}{'positions':>11}{'useful %':>10}{'seconds':>9}{'tok/s':>9}")
    for k in ("padded", "packed"):
        print(
            f"{k:<10}{len(variants[k]):>7}{positions[k]:>11}"
            f"{100 * real_tokens / positions[k]:>9.1f}%{elapsed[k]:>9.1f}{rate[k]:>9.1f}"
        )
    print(f"{'ratio':<10}{r['ratio']:>46.2f}")


if __name__ == "__main__":
    main()

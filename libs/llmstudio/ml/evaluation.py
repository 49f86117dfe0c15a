"""Evaluate a model, or a fine-tune of it (a checkpoint: adapter or full weights), on validation
rows.

- eval_loss: mean cross-entropy over the learned tokens of every row (masked exactly as in
  training, see llmstudio.ml.data: completion / assistant tokens; every token of a "text" row;
  prompt + chosen of a preference row), perplexity = exp(eval_loss).
- exact_match: greedy generation (batched, left padding) on the first `max_samples` rows that
  have a reference answer (prompt/completion, messages, preference rows, whose reference is the
  chosen answer; plain "text" rows have none and are scored by loss only); a hit when the
  generated text, stripped, equals the reference, stripped. `samples` is how many rows were
  generated; when none has a reference, exact_match is None (not measured) and samples is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from llmstudio.ml.checkpoint import checkpoint_kind
from llmstudio.ml.data import (
    causal_lm_loss_sum,
    collate,
    encode_example,
    encode_prompt,
    has_reference,
    pad_id_of,
    prompt_text,
    reference_text,
)

ProgressFn = Callable[[int, int], None]  # (rows done, rows total) over loss + generation


def _base(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _with_adapter(model_dir: str, checkpoint_dir: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir), checkpoint_dir)


def _full_weights(_model_dir: str, checkpoint_dir: str):
    return _base(checkpoint_dir)  # every weight, and the config, are the checkpoint's


# How each kind of checkpoint (llmstudio.ml.checkpoint.checkpoint_kind) becomes a model.
LOADERS = {"adapter": _with_adapter, "full": _full_weights}


def load_for_inference(model_dir: str, checkpoint_dir: str | None = None):
    """(model, tokenizer, device): fp32, eval mode. `checkpoint_dir`: a fine-tune of `model_dir`,
    an adapter applied on it or full weights loaded instead of its own; the tokenizer is always
    `model_dir`'s (training never changes it)."""
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if checkpoint_dir is None:
        model = _base(model_dir)
    else:
        model = LOADERS[checkpoint_kind(checkpoint_dir)](model_dir, checkpoint_dir)
    model.to(device).eval()
    return model, tokenizer, device


@torch.no_grad()
def evaluate_model(
    model_dir: str,
    rows: list[dict],
    *,
    checkpoint_dir: str | None = None,
    max_samples: int = 64,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_seq_length: int = 1024,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Loss/perplexity on all `rows`; exact match on the first `max_samples` rows that have a
    reference answer (None when no row has one)."""
    if not rows:
        raise ValueError("no rows to evaluate")
    torch.manual_seed(0)
    model, tokenizer, device = load_for_inference(model_dir, checkpoint_dir)
    pad_id = pad_id_of(tokenizer)
    gen_rows = [r for r in rows if has_reference(r)][:max_samples]
    total = len(rows) + len(gen_rows)
    done = 0

    # 1. loss over the learned (completion / assistant) tokens
    loss_sum, n_tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = collate([encode_example(tokenizer, r, max_seq_length) for r in chunk], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        s, n = causal_lm_loss_sum(logits, batch["labels"])
        loss_sum += float(s)
        n_tokens += n
        done += len(chunk)
        if progress:
            progress(done, total)
    eval_loss = loss_sum / n_tokens if n_tokens else math.nan
    try:
        perplexity = math.exp(eval_loss)
    except OverflowError:
        perplexity = math.inf

    # 2. greedy generation, left padded
    eos_ids = _eos_ids(model, tokenizer)
    predictions: list[str] = []
    for i in range(0, len(gen_rows), batch_size):
        chunk = gen_rows[i : i + batch_size]
        prompts = [encode_prompt(tokenizer, r)[-max_seq_length:] for r in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )
        for seq in out[:, width:].tolist():
            predictions.append(_decode_until_eos(tokenizer, seq, eos_ids))
        done += len(chunk)
        if progress:
            progress(done, total)

    references = [reference_text(r) for r in gen_rows]
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return {
        "eval_loss": eval_loss,
        "perplexity": perplexity,
        "exact_match": hits / len(gen_rows) if gen_rows else None,
        "samples": len(gen_rows),
        "loss_tokens": n_tokens,
        "examples": [
            {"prompt": prompt_text(tokenizer, r), "reference": ref, "prediction": pred}
            for r, ref, pred in zip(gen_rows[:5], references[:5], predictions[:5], strict=False)
        ],
    }


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tid in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [
        tokenizer.eos_token_id
    ]:
        if tid is not None and tid not in ids:
            ids.append(int(tid))
    return ids


def _decode_until_eos(tokenizer, seq: list[int], eos_ids: list[int]) -> str:
    for j, t in enumerate(seq):
        if t in eos_ids:
            seq = seq[:j]
            break
    return tokenizer.decode(seq, skip_special_tokens=True)

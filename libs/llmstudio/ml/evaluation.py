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
- outputs: what llmstudio.ml.metrics scores per sample (loss sum and learned tokens of every
  row, every prediction and its reference), so any metric and its paired bootstrap interval can
  be computed from it.
- task_scores: per-sample scores of each task file (llmstudio.ml.tasks) given as `tasks`:
  generation tasks scored exact / contains / regex, multiple-choice tasks by log-likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
from llmstudio.ml.tasks import (
    CONTINUATION_DELIMITER,
    MULTIPLE_CHOICE,
    TaskFile,
    choose,
    score_output,
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
    tasks: Sequence[TaskFile] = (),
) -> dict[str, Any]:
    """Loss/perplexity on all `rows`; exact match on the first `max_samples` rows that have a
    reference answer (None when no row has one); the per-sample scores of `tasks`."""
    if not rows:
        raise ValueError("no rows to evaluate")
    torch.manual_seed(0)
    model, tokenizer, device = load_for_inference(model_dir, checkpoint_dir)
    pad_id = pad_id_of(tokenizer)
    gen_rows = [r for r in rows if has_reference(r)][:max_samples]
    total = len(rows) + len(gen_rows) + sum(len(t.rows) for t in tasks)
    done = 0

    # 1. loss over the learned (completion / assistant) tokens
    loss_sums: list[float] = []
    loss_tokens: list[int] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = collate([encode_example(tokenizer, r, max_seq_length) for r in chunk], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        ).logits
        for j in range(len(chunk)):  # per row: the metrics resample rows
            s, n = causal_lm_loss_sum(logits[j : j + 1], batch["labels"][j : j + 1])
            loss_sums.append(float(s))
            loss_tokens.append(n)
        done += len(chunk)
        if progress:
            progress(done, total)
    loss_sum, n_tokens = sum(loss_sums), sum(loss_tokens)
    eval_loss = loss_sum / n_tokens if n_tokens else math.nan
    try:
        perplexity = math.exp(eval_loss)
    except OverflowError:
        perplexity = math.inf

    # 2. greedy generation, left padded
    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    gen = _Generator(model, tokenizer, device, pad_id, max_new_tokens, max_seq_length,
                     batch_size)
    predictions = gen.run(gen_rows, advance)
    references = [reference_text(r) for r in gen_rows]
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))

    # 3. task files
    task_scores: dict[str, list[float]] = {}
    for task in tasks:
        if task.kind == MULTIPLE_CHOICE:
            acc, acc_norm = _multiple_choice(model, tokenizer, device, task, max_seq_length,
                                             advance)
            task_scores.update(zip(task.metric_names(), (acc, acc_norm), strict=True))
        else:
            outs = gen.run([{"prompt": r["input"], "completion": r["expected"]}
                            for r in task.rows], advance)
            task_scores[task.metric_names()[0]] = [
                score_output(task.scoring, o, r["expected"])
                for o, r in zip(outs, task.rows, strict=True)]
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
        "outputs": {"loss_sums": loss_sums, "loss_tokens": loss_tokens,
                    "predictions": predictions, "references": references},
        "task_scores": task_scores,
    }


class _Generator:
    """Greedy generation in batches, left padded, decoded up to the first EOS."""

    def __init__(self, model, tokenizer, device, pad_id: int, max_new_tokens: int,
                 max_seq_length: int, batch_size: int):
        self.model, self.tokenizer, self.device, self.pad_id = model, tokenizer, device, pad_id
        self.max_new_tokens, self.max_seq_length = max_new_tokens, max_seq_length
        self.batch_size = batch_size
        self.eos_ids = _eos_ids(model, tokenizer)

    def run(self, rows: list[dict], advance: Callable[[int], None]) -> list[str]:
        predictions: list[str] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            prompts = [encode_prompt(self.tokenizer, r)[-self.max_seq_length:] for r in chunk]
            width = max(len(p) for p in prompts)
            pad = self.pad_id
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=self.eos_ids,
                pad_token_id=pad,
            )
            for seq in out[:, width:].tolist():
                predictions.append(_decode_until_eos(self.tokenizer, seq, self.eos_ids))
            advance(len(chunk))
        return predictions


def choice_logliks(model, tokenizer, device, query: str, choices: list[str],
                   max_seq_length: int = 1024) -> list[float]:
    """The model's log-likelihood of each choice's tokens (" " + choice, the harness's target
    delimiter) after `query` (encoded as a prompt: one BOS where the tokenizer has one); the
    query is cut on the left so that every sequence fits `max_seq_length`."""
    ctx = encode_prompt(tokenizer, {"prompt": query, "completion": ""})
    conts = [list(tokenizer(CONTINUATION_DELIMITER + c, add_special_tokens=False)["input_ids"])
             for c in choices]
    keep = max(1, max_seq_length - max(len(c) for c in conts))
    ctx = ctx[-keep:]
    seqs = [ctx + c for c in conts]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs],
                             device=device)
    logprobs = torch.log_softmax(
        model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
    out: list[float] = []
    for i, cont in enumerate(conts):
        # token t of the continuation sits at position len(ctx)+t, predicted at one before
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device)
        targets = torch.tensor(cont, device=device)
        out.append(float(logprobs[i, positions, targets].sum()))
    return out


def _multiple_choice(model, tokenizer, device, task: TaskFile, max_seq_length: int,
                     advance: Callable[[int], None]) -> tuple[list[float], list[float]]:
    acc: list[float] = []
    acc_norm: list[float] = []
    for row in task.rows:
        ll = choice_logliks(model, tokenizer, device, row["query"], row["choices"],
                            max_seq_length)
        a, n = choose(ll, row["choices"])
        acc.append(float(a == row["gold"]))
        acc_norm.append(float(n == row["gold"]))
        advance(1)
    return acc, acc_norm


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

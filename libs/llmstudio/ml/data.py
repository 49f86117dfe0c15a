"""Rows -> token ids with loss masking, shared by training and evaluation.

Four row shapes:

- ``{"prompt": str, "completion": str}``: BOS (when the tokenizer has one), the prompt, the
  completion without special tokens, then EOS. Only completion tokens and the EOS are learned
  (labels = -100 elsewhere).
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template,
  preceded by BOS when the tokenizer has one and the template put none first; only the tokens
  of assistant turns (their content and the template's end-of-turn markers) are learned.
  Assistant spans are found by rendering the conversation incrementally and mapping character
  spans to tokens through the fast tokenizer's offsets.
- ``{"text": str}`` (continued pre-training): encoded like any text (BOS if the tokenizer adds
  one), then EOS; every token is learned. Such a row has no reference answer
  (``has_reference`` is False): evaluation scores its loss only.
- ``{"prompt": str, "chosen": str, "rejected": str}`` (preference data, DPO/ORPO): outside the
  preference trainer it reads as prompt/completion with the chosen answer as the completion,
  so SFT and evaluation on preference data use prompt + chosen.

A prompt/completion or chat sequence starts with the tokenizer's BOS whenever it has one, also
where its default encoding adds none (SmolLM2's tokenizer names one but does not add it), and
never twice: what LLaMA-Factory's templates ({"bos_token"} prefix) and HF chat templates
({{ bos_token }}) do.

Generation-based evaluation uses the same prompt encoding (``encode_prompt``), so what the model
sees at evaluation time is exactly what preceded the learned tokens during training.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


class RowError(ValueError):
    """A row that cannot be encoded (wrong shape, no chat template...)."""


# --------------------------------------------------------------------------------------------
# helpers


def _strings(row: dict, keys: tuple[str, ...]) -> None:
    bad = [k for k in keys if not isinstance(row[k], str)]
    if bad:
        raise RowError(f"{' and '.join(repr(k) for k in keys)} must be strings (not {bad})")


def _row_kind(row: dict) -> str:
    """messages | prompt_completion | preference | text (RowError for anything else)."""
    if not isinstance(row, dict):
        raise RowError(f"row must be an object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RowError("'messages' must be a non-empty list of {role, content}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RowError(f"messages[{i}] must have 'role' and 'content'")
            if not isinstance(m["content"], str):
                raise RowError(f"messages[{i}].content must be a string")
        return "messages"
    if "prompt" in row and "completion" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise RowError("'prompt' and 'completion' must be strings")
        return "prompt_completion"
    if "prompt" in row and "chosen" in row and "rejected" in row:
        _strings(row, ("prompt", "chosen", "rejected"))
        return "preference"
    if "text" in row:
        _strings(row, ("text",))
        return "text"
    raise RowError(
        "row must have 'prompt' and 'completion', or 'messages', or 'text', or 'prompt', "
        f"'chosen' and 'rejected'; got keys {sorted(row)}"
    )


def _completion(row: dict) -> str:
    """The learned answer of a prompt/completion or preference row."""
    return row["completion"] if "completion" in row else row["chosen"]


def _needs_bos(tokenizer, ids: list[int]) -> bool:
    """Whether `ids` lack the BOS that the tokenizer has (none is added where it has none)."""
    bos = tokenizer.bos_token_id
    return bos is not None and (not ids or ids[0] != bos)


def _encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt as a sequence's start: the text's tokens after exactly one BOS (if any)."""
    ids = _encode_text(tokenizer, text)
    return [tokenizer.bos_token_id, *ids] if _needs_bos(tokenizer, ids) else ids


def _encode_text(tokenizer, text: str) -> list[int]:
    """Encode `text` as the tokenizer does by default, minus any trailing EOS it appends."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and not text.endswith(tokenizer.eos_token):
        ids.pop()
    return ids


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError(
            "the tokenizer has no chat template, so 'messages' rows cannot be rendered; "
            "use prompt/completion rows for this model"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode_rendered(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Encode a rendered chat: special tokens come from the template; BOS first if the
    tokenizer has one and the template did not put it there."""
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast)
    )
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]] if tokenizer.is_fast else None
    if _needs_bos(tokenizer, ids):
        ids.insert(0, tokenizer.bos_token_id)
        if offsets is not None:
            offsets.insert(0, (0, 0))
    return ids, offsets


def _assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of `full` to learn: each assistant turn's content + end markers."""
    spans = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if i and upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
            cursor = len(upto)
            continue
        # Template is not prefix-stable (e.g. rewrites earlier turns): fall back to the content.
        pos = full.find(msg["content"], cursor)
        if pos < 0:
            raise RowError(f"messages[{i}]: assistant content not found in the rendered chat")
        spans.append((pos, pos + len(msg["content"])))
        cursor = pos + len(msg["content"])
    return spans


# --------------------------------------------------------------------------------------------
# public API


def has_reference(row: dict) -> bool:
    """Does `row` have an expected answer to generate (all shapes but plain text)?"""
    return _row_kind(row) != "text"


def encode_prompt(tokenizer, row: dict) -> list[int]:
    """Token ids the model is conditioned on when it generates the answer to `row`."""
    kind = _row_kind(row)
    if kind == "text":
        raise RowError("a 'text' row has no prompt: it is scored by its loss only")
    if kind in ("prompt_completion", "preference"):
        return _encode_prompt(tokenizer, row["prompt"])
    ids, _ = _encode_rendered(tokenizer, prompt_text(tokenizer, row))
    return ids


def prompt_text(tokenizer, row: dict) -> str:
    """The text a model continues at evaluation: the prompt, or the chat up to the last
    assistant turn with the generation prompt appended ('' for a text row)."""
    kind = _row_kind(row)
    if kind == "text":
        return ""
    if kind in ("prompt_completion", "preference"):
        return row["prompt"]
    msgs = row["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return _render(tokenizer, msgs[:last], add_generation_prompt=True)


def reference_text(row: dict) -> str:
    """The expected answer: the completion, the chosen answer of a preference row, or the
    content of the last assistant turn ('' for a text row: see `has_reference`)."""
    kind = _row_kind(row)
    if kind == "text":
        return ""
    if kind in ("prompt_completion", "preference"):
        return _completion(row)
    for m in reversed(row["messages"]):
        if m["role"] == "assistant":
            return m["content"]
    return ""


def encode_example(tokenizer, row: dict, max_len: int) -> dict[str, list[int]]:
    """`row` -> {input_ids, labels, attention_mask}, truncated on the right to `max_len`."""
    kind = _row_kind(row)
    if kind == "text":
        input_ids = _encode_text(tokenizer, row["text"])
        if tokenizer.eos_token_id is not None:
            input_ids.append(tokenizer.eos_token_id)
        labels = list(input_ids)  # continued pre-training: every token is learned
    elif kind in ("prompt_completion", "preference"):
        prompt_ids = _encode_prompt(tokenizer, row["prompt"])
        completion_ids = list(tokenizer(_completion(row), add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        input_ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    else:
        messages = row["messages"]
        full = _render(tokenizer, messages, add_generation_prompt=False)
        spans = _assistant_spans(tokenizer, messages, full)
        input_ids, offsets = _encode_rendered(tokenizer, full)
        if offsets is None:
            raise RowError("'messages' rows need a fast tokenizer (offset mapping)")

        def learned(off: tuple[int, int]) -> bool:
            start, end = off
            return end > start and any(a <= start < b for a, b in spans)

        labels = [t if learned(o) else IGNORE_INDEX
                  for t, o in zip(input_ids, offsets, strict=True)]
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right: input_ids with `pad_id`, labels with -100, attention_mask with 0."""
    width = max(len(ex["input_ids"]) for ex in batch)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor(
            [ex[key] + [value] * (width - len(ex[key])) for ex in batch], dtype=torch.long
        )

    return {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "attention_mask": pad("attention_mask", 0),
    }


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there were."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def count_learned_tokens(example: dict[str, Any]) -> int:
    """Labelled tokens that a causal LM is actually trained on (the first token never is)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)

"""Sequence packing without cross-example attention leakage.

Several encoded examples (``encode_example`` output) share one row of the batch instead of each
being padded to the longest example of its batch. Each example is a *segment* of its row:

- ``position_ids`` restart at 0 at every segment start;
- attention is block-diagonal causal: a token only sees earlier tokens of its own segment;
- the label of a segment's first token is -100, so the shifted next-token loss never scores a
  token from the previous segment's context (a causal LM never learns an example's first token
  anyway: ``data.count_learned_tokens`` is unchanged).

The block-diagonal mask comes from transformers itself (checked on 5.23): when a model
is called with ``position_ids``, **no** ``attention_mask`` and **no KV cache**,
``masking_utils.create_causal_mask`` finds the segments from the position resets
(``find_packed_sequence_indices``) and builds a block-diagonal causal mask for sdpa, eager and
flex attention; flash-attention uses the same position ids for its variable-length kernel.

Two ways to silently lose it (both are tested as negative controls):

- passing an ``attention_mask`` (even all ones): ``collate_packed`` returns none on purpose;
- leaving ``use_cache`` on: it defaults to ``config.use_cache`` (True for most models) even in
  training mode, and with a cache transformers skips the packed-sequence detection.

So call ``model(**batch, use_cache=False)`` (``labels`` included is fine), or set
``model.config.use_cache = False`` once after loading the model for training.

Padding at the end of a row is its own segment (positions from 0, labels -100): real tokens never
attend to it (causality), and nothing is learned from it.
"""

from __future__ import annotations

import torch

from llmstudio.ml.data import IGNORE_INDEX


def _length(example: dict) -> int:
    return len(example["input_ids"])


def pack_examples(examples: list[dict], max_len: int) -> list[list[int]]:
    """Group example indices into bins whose total length is <= `max_len`.

    First-fit decreasing: examples by decreasing length (ties by index), each into the first bin
    with room. Deterministic. Every index appears in exactly one bin; each bin's indices are
    sorted ascending. Raises ValueError if an example alone is longer than `max_len` (encode with
    ``encode_example(..., max_len)`` first, which truncates).
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    lengths = [_length(ex) for ex in examples]
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}")
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))

    # First fit in O(log bins) per example: a segment tree over bin capacities (max remaining
    # room in each subtree); bins are opened left to right, unopened leaves have room max_len.
    size = 1
    while size < max(1, len(examples)):
        size *= 2
    room = [max_len] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins]


def collate_packed(
    examples: list[dict], bins: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """One row per bin, the bin's examples back to back, padded on the right to the longest row.

    Returns ``input_ids``, ``labels`` and ``position_ids`` ([rows, width] int64 tensors) — and
    deliberately no ``attention_mask`` (see the module docstring): the model derives the
    block-diagonal causal mask from ``position_ids`` — call it with ``use_cache=False``.
    """
    rows = []
    for b in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in b:
            ex = examples[i]
            n = _length(ex)
            if n == 0:
                continue
            ex_labels = list(ex["labels"])
            if len(ex_labels) != n:
                raise ValueError(f"example {i}: labels and input_ids differ in length")
            ids.extend(ex["input_ids"])
            labels.append(IGNORE_INDEX)  # never predicted from the previous segment
            labels.extend(ex_labels[1:])
            pos.extend(range(n))
        rows.append((ids, labels, pos))
    width = max((len(r[0]) for r in rows), default=0)
    width = max(width, 1)

    def tensor(k: int, pad_value) -> torch.Tensor:
        out = []
        for r in rows:
            n_pad = width - len(r[0])
            out.append(r[k] + (list(range(n_pad)) if pad_value is None else [pad_value] * n_pad))
        return torch.tensor(out, dtype=torch.long)

    return {
        "input_ids": tensor(0, pad_id),
        "labels": tensor(1, IGNORE_INDEX),
        "position_ids": tensor(2, None),  # padding: a segment of its own, from position 0
    }

"""Next-token loss without materializing the full [batch, seq, vocab] logits.

With a 49k vocabulary the logits of a batch of 8 x 128 tokens are 192 MiB in fp32, and autograd
keeps several copies: for adapter methods that is most of the training memory. Here only the
positions that carry a label go through the output head, in chunks whose logits are recomputed
during backward (activation checkpointing), so at most one chunk of logits lives at a time.
The result equals `data.causal_lm_loss_sum` on the full logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 128


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module):
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there were.

    `hidden` is the decoder's last hidden state [B, T, H] (before the output head), `head` the
    output projection (lm_head), `labels` [B, T] with IGNORE_INDEX where nothing is learned.
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_tokens):
        total = total + checkpoint(
            _chunk_ce_sum, h[start:start + chunk_tokens], y[start:start + chunk_tokens], head,
            use_reentrant=False,
        )
    return total, int(y.numel())


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder stack and output head of a causal LM (through a peft wrapper), or None when
    the model has no such split (e.g. prompt-learning adapters, which prepend virtual tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(model, "peft_config", None):
        cfg = next(iter(model.peft_config.values()))
        if getattr(cfg, "is_prompt_learning", False):
            return None
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head

"""Next-token loss without materializing the full [batch, seq, vocab] logits.

With a 49k vocabulary the logits of a batch of 8 x 128 tokens are 192 MiB in fp32, and autograd
keeps several copies: for adapter methods that is most of the training memory. Here only the
positions that carry a label go through the output head, in chunks whose logits are recomputed
during backward (activation checkpointing), so at most one chunk of logits lives at a time.
The result equals `data.causal_lm_loss_sum` on the full logits.

`CausalLMLossSum` is a model and its loss as one module: the trainer's recipe trains through it
(and wraps it, not the model, in DDP / FSDP).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX, causal_lm_loss_sum

DEFAULT_CHUNK_TOKENS = 128

# Architectures whose causal-LM forward is exactly `lm_head(model(...).last_hidden_state)`.
# Others change the logits after the head (Gemma 2 soft-caps them, Cohere and Granite scale
# them, ...), so the decoder + head split would compute a different loss: they keep the full
# logits.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "gemma", "llama", "mistral", "mixtral", "olmo", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "smollm3", "starcoder2",
})


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
    the model has no such split: prompt-learning adapters (they prepend virtual tokens in the
    peft wrapper's forward) and architectures outside PLAIN_HEAD_MODEL_TYPES."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(model, "peft_config", None):
        cfg = next(iter(model.peft_config.values()))
        if getattr(cfg, "is_prompt_learning", False):
            return None
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head


class CausalLMLossSum(torch.nn.Module):
    """`model` and its next-token loss: forward(labels=..., **model_inputs) -> the sum of the
    cross-entropy over the labelled positions (a 0-dim fp32 tensor).

    The chunked loss when the model has a decoder / head split (`decoder_and_head`), else the
    full logits, with the `logits_offset` leading virtual-token positions of prompt learning
    dropped. Data-parallel wrappers must wrap this module rather than `model`: the chunked path
    calls the decoder and the head directly, bypassing `model.forward`, and only the wrapper's
    own forward runs DDP's gradient-sync bookkeeping and FSDP's all-gather of the root's
    parameters (embeddings, output head).
    """

    def __init__(self, model: torch.nn.Module, logits_offset: int = 0,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().__init__()
        self.model = model
        self.logits_offset = logits_offset
        self.chunk_tokens = chunk_tokens

    def forward(self, labels: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        split = decoder_and_head(self.model)
        if split is None:
            logits = self.model(**inputs).logits[:, self.logits_offset:]
            return causal_lm_loss_sum(logits, labels)[0]
        decoder, head = split
        hidden = decoder(**inputs).last_hidden_state
        return chunked_lm_loss_sum(hidden, head, labels, self.chunk_tokens)[0]

"""Next-token loss without materializing the full [batch, seq, vocab] logits.

With a 49k vocabulary the logits of a batch of 8 x 128 tokens are 192 MiB in fp32, and autograd
keeps several copies: for adapter methods that is most of the training memory. Here only the
positions that carry a label go through the output head, in chunks of about CHUNK_LOGITS
logits, so at most one chunk of logits lives at a time. A plain linear head (the usual case)
gets its gradients in the same pass: each chunk's logits turn into the gradient of the loss
w.r.t. the hidden states (and the head's weight when it trains) before the next chunk, so
backward only scales them and nothing is recomputed (the head is 20% of SmolLM2's forward).
Other heads (quantized, adapted) keep autograd, with each chunk's logits recomputed during
backward (activation checkpointing). The result equals `data.causal_lm_loss_sum` on the full
logits.

`CausalLMLossSum` is a model and its loss as one module: the trainer's recipe trains through it
(and wraps it, not the model, in DDP / FSDP).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX, causal_lm_loss_sum

# Logits per chunk: 24 MiB in fp32; SmolLM2's 49k vocabulary gets 128 tokens a chunk, a small
# vocabulary one chunk for the whole batch.
CHUNK_LOGITS = 6 * 2**20

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


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum(cross_entropy(h @ weight.T + bias, y)) with every gradient computed chunk by chunk in
    forward: d loss / d logits = softmax - one_hot(y) needs nothing but the chunk's logits."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        train_bias = bias is not None and bias.requires_grad
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if train_bias else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, y.numel(), chunk):
            hs, ys = h[start:start + chunk], y[start:start + chunk]
            raw = torch.nn.functional.linear(hs, weight, bias)  # autocast's dtype, if any
            logits = raw.float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (lse - logits.gather(1, ys[:, None])).sum()
            grad = logits.sub_(lse).exp_()  # softmax, in the logits' memory
            grad[torch.arange(len(ys), device=ys.device), ys] -= 1
            grad = grad.to(raw.dtype)
            # the two matmuls of the head's backward, in the forward's precision (linear casts)
            grad_h[start:start + chunk] = torch.nn.functional.linear(grad, weight.t())
            if grad_w is not None:
                grad_w += torch.nn.functional.linear(grad.t(), hs.t())
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.param_dtypes = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        return (
            grad_h * grad_total.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_total).to(w_dtype),
            None if grad_b is None else (grad_b * grad_total).to(b_dtype),
            None,
            None,
        )


def chunked_lm_loss_sum(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there were.

    `hidden` is the decoder's last hidden state [B, T, H] (before the output head), `head` the
    output projection (lm_head), `labels` [B, T] with IGNORE_INDEX where nothing is learned.
    `chunk_tokens` defaults to CHUNK_LOGITS / vocabulary size.
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    vocab = getattr(head, "out_features", None) or int(head.weight.shape[0])  # type: ignore[index]
    chunk = chunk_tokens or max(1, CHUNK_LOGITS // vocab)
    if type(head) is torch.nn.Linear:  # exactly: not a quantized or adapted subclass
        return _LinearCrossEntropySum.apply(h, head.weight, head.bias, y, chunk), int(y.numel())
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        total = total + checkpoint(
            _chunk_ce_sum, h[start:start + chunk], y[start:start + chunk], head,
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
                 chunk_tokens: int | None = None) -> None:
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

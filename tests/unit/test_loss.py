"""The chunked loss equals the plain loss on full logits, in value and in gradients."""

from __future__ import annotations

import pytest
import torch

from llmstudio.ml.data import IGNORE_INDEX, causal_lm_loss_sum
from llmstudio.ml.loss import CausalLMLossSum, chunked_lm_loss_sum, decoder_and_head


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from llmstudio.ml.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return _load(tiny_dir)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX  # a prompt
    labels[2, 15:] = IGNORE_INDEX  # padding
    return ids, labels


class _OtherHead(torch.nn.Linear):
    """Not exactly nn.Linear (as a quantized or adapted head): the checkpointed chunks."""


def _other_head(head: torch.nn.Linear) -> _OtherHead:
    other = _OtherHead(head.in_features, head.out_features, bias=head.bias is not None)
    other.weight = head.weight  # the same (tied) parameter: its gradient is compared
    return other


HEADS = {"linear": lambda head: head, "checkpointed": _other_head}


@pytest.mark.parametrize("head_kind", HEADS)
@pytest.mark.parametrize("chunk", [1, 7, 4096, None])
def test_chunked_loss_and_gradients_match_the_full_logits(tiny, chunk, head_kind):
    ids, labels = _batch()
    tiny.zero_grad()
    full, n_full = causal_lm_loss_sum(tiny(input_ids=ids).logits, labels)
    full.backward()
    want = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}

    tiny.zero_grad()
    decoder, head = decoder_and_head(tiny)
    hidden = decoder(input_ids=ids).last_hidden_state
    got, n_got = chunked_lm_loss_sum(hidden, HEADS[head_kind](head), labels, chunk_tokens=chunk)
    got.backward()
    assert n_got == n_full == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(got, full, rtol=1e-5)
    for name, grad in want.items():
        assert torch.allclose(dict(tiny.named_parameters())[name].grad, grad, atol=1e-5), name


def test_prompt_learning_adapters_have_no_decoder_head_split(tiny):
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(
        tiny, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert decoder_and_head(peft_model) is None


def test_heads_that_rescale_the_logits_keep_the_full_logits(tiny, monkeypatch):
    assert decoder_and_head(tiny) is not None
    monkeypatch.setattr(tiny.config, "model_type", "gemma2")  # soft-caps its logits
    assert decoder_and_head(tiny) is None


def test_loss_module_equals_the_loss_of_the_full_logits(tiny):
    ids, labels = _batch()
    with torch.no_grad():
        want, _ = causal_lm_loss_sum(tiny(input_ids=ids).logits, labels)
        got = CausalLMLossSum(tiny, chunk_tokens=7)(input_ids=ids, labels=labels)
    assert torch.allclose(got, want, rtol=1e-5)


def test_linear_head_gradients_under_bf16_autocast_match_the_checkpointed_chunks(tiny_dir):
    """The fused head computes its backward matmuls in autocast's dtype, like autograd would."""
    tiny = _load(tiny_dir)  # every parameter trains (a peft wrapper froze the shared one's)
    ids, labels = _batch()
    decoder, head = decoder_and_head(tiny)
    results = {}
    for kind, make in HEADS.items():
        tiny.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = decoder(input_ids=ids).last_hidden_state
            loss, _ = chunked_lm_loss_sum(hidden, make(head), labels, chunk_tokens=7)
        loss.backward()
        results[kind] = loss.detach(), head.weight.grad.clone()
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    assert loss_a.dtype == torch.float32
    # bf16 keeps 8 significant bits: 2**-8 relative per rounding, a few roundings deep
    assert torch.allclose(loss_a, loss_b, rtol=2**-6)
    assert (grad_a - grad_b).norm() <= 2**-5 * grad_b.norm()

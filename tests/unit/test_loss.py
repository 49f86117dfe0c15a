"""The chunked loss equals the plain loss on full logits, in value and in gradients."""

from __future__ import annotations

import pytest
import torch

from llmstudio.ml.data import IGNORE_INDEX, causal_lm_loss_sum
from llmstudio.ml.loss import CausalLMLossSum, chunked_lm_loss_sum, decoder_and_head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from llmstudio.ml.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX  # a prompt
    labels[2, 15:] = IGNORE_INDEX  # padding
    return ids, labels


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_and_gradients_match_the_full_logits(tiny, chunk):
    ids, labels = _batch()
    tiny.zero_grad()
    full, n_full = causal_lm_loss_sum(tiny(input_ids=ids).logits, labels)
    full.backward()
    want = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}

    tiny.zero_grad()
    decoder, head = decoder_and_head(tiny)
    hidden = decoder(input_ids=ids).last_hidden_state
    got, n_got = chunked_lm_loss_sum(hidden, head, labels, chunk_tokens=chunk)
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

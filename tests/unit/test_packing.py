"""Sequence packing (llmstudio.ml.packing): no attention leakage across packed examples."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmstudio.ml.data import IGNORE_INDEX, causal_lm_loss_sum, encode_example, pad_id_of
from llmstudio.ml.packing import collate_packed, pack_examples
from llmstudio.ml.tiny import build_tiny_model

ROWS = [
    {
        "prompt": "Reverse the order of the words: apple river stone\nAnswer:",
        "completion": " stone river apple",
    },
    {"prompt": "Hello!", "completion": " How are you?"},
    {
        "messages": [
            {"role": "user", "content": "What is 2 + 3? Reverse the order of the words."},
            {"role": "assistant", "content": "It is 5."},
        ]
    },
    {
        "prompt": "a b c d e f g h i j k l m n o p q r s t u v w x y z",
        "completion": " the of and to a in is it you that he was for on are",
    },
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def examples(tok):
    exs = [encode_example(tok, row, 128) for row in ROWS]
    assert len({len(e["input_ids"]) for e in exs}) == len(exs), "want distinct lengths"
    return exs


def _model(tiny_dir, attn: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, attn_implementation=attn, dtype=torch.float32
    )
    return model.eval()


def _segments(bin_, examples):
    """(example index, start, length) of each segment in a packed row."""
    out, start = [], 0
    for i in bin_:
        n = len(examples[i]["input_ids"])
        out.append((i, start, n))
        start += n
    return out


# --------------------------------------------------------------------------------------------
# bins


def test_bins_respect_max_len_cover_every_example_once_and_are_deterministic():
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 17, 30, 64]) for _ in range(200)] + [64, 1, 0]
    exs = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    bins = pack_examples(exs, 64)
    assert sorted(i for b in bins for i in b) == list(range(len(exs)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert all(b == sorted(b) for b in bins)
    assert pack_examples(exs, 64) == bins
    # first-fit decreasing is near-optimal here: no more than one bin above the lower bound
    assert len(bins) <= -(-sum(lengths) // 64) + 1


def test_first_fit_decreasing_order_and_errors():
    exs = [{"input_ids": [1] * n, "labels": [1] * n} for n in (4, 7, 3, 6, 2)]
    # decreasing: 7->b0, 6->b1, 4->b2 (7+4>10, 6+4=10 -> b1!), 3->b0, 2->b2
    assert pack_examples(exs, 10) == [[1, 2], [0, 3], [4]]
    assert pack_examples([], 8) == []
    with pytest.raises(ValueError, match="more than max_len"):
        pack_examples(exs, 6)
    with pytest.raises(ValueError):
        pack_examples(exs, 0)


def test_collate_packed_layout(examples):
    bins = [[0, 1], [2], [3]]
    batch = collate_packed(examples, bins, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    lens = [len(e["input_ids"]) for e in examples]
    width = max(lens[0] + lens[1], lens[2], lens[3])
    for k in batch:
        assert batch[k].shape == (3, width) and batch[k].dtype == torch.long
    row = batch["position_ids"][0].tolist()
    assert row[: lens[0] + lens[1]] == list(range(lens[0])) + list(range(lens[1]))
    assert row[lens[0] + lens[1] :] == list(range(width - lens[0] - lens[1]))
    assert batch["input_ids"][0, : lens[0]].tolist() == examples[0]["input_ids"]
    assert batch["input_ids"][0, lens[0] + lens[1] :].eq(0).all()
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[lens[0]] == IGNORE_INDEX  # segment starts
    assert labels[1 : lens[0]] == examples[0]["labels"][1:]
    assert all(t == IGNORE_INDEX for t in labels[lens[0] + lens[1] :])


# --------------------------------------------------------------------------------------------
# no leakage on a real model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards(tiny_dir, tok, examples, attn):
    model = _model(tiny_dir, attn)
    bins = [[0, 1, 2, 3]]  # all four (different lengths) in one row, plus some padding
    batch = collate_packed(examples, bins, pad_id_of(tok))
    assert batch["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)
    # two rows: the packed row, and one with a single short example + padding
    batch2 = collate_packed(examples, [[0, 1, 2, 3], [1]], pad_id_of(tok))
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        packed2 = model(
            input_ids=batch2["input_ids"], position_ids=batch2["position_ids"], use_cache=False
        ).logits
        packed_loss, packed_n = causal_lm_loss_sum(packed, batch["labels"])
        sep_loss, sep_n = 0.0, 0
        for i, start, n in _segments(bins[0], examples):
            ids = torch.tensor([examples[i]["input_ids"]])
            alone = model(input_ids=ids).logits
            torch.testing.assert_close(packed[0, start : start + n], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                packed2[0, start : start + n], alone[0], atol=1e-5, rtol=1e-5
            )
            loss, cnt = causal_lm_loss_sum(alone, torch.tensor([examples[i]["labels"]]))
            sep_loss, sep_n = sep_loss + loss, sep_n + cnt
        n1 = len(examples[1]["input_ids"])
        alone1 = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits
        torch.testing.assert_close(packed2[1, :n1], alone1[0], atol=1e-5, rtol=1e-5)
    assert packed_n == sep_n > 0
    torch.testing.assert_close(packed_loss, sep_loss, atol=1e-4, rtol=1e-5)
    # the model's own loss (labels=) agrees too: same mean over the same tokens
    with torch.no_grad():
        hf_loss = model(**batch, use_cache=False).loss
    torch.testing.assert_close(hf_loss, sep_loss / sep_n, atol=1e-5, rtol=1e-5)


def test_without_block_mask_segments_leak(tiny_dir, tok, examples):
    """Negative controls: the same packed row run (a) with a plain 2D ones mask and default
    positions, (b) with the right positions but an explicit 2D mask, or (c) with the right
    positions but the KV cache on (the model's default) — (b) and (c) switch transformers'
    packed-sequence detection off — gives different logits for every segment after the first."""
    model = _model(tiny_dir, "sdpa")
    bins = [[0, 1, 2, 3]]
    batch = collate_packed(examples, bins, pad_id_of(tok))
    ones = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        naive = model(input_ids=batch["input_ids"], attention_mask=ones).logits
        masked_2d = model(
            input_ids=batch["input_ids"],
            attention_mask=ones,
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for k, (i, start, n) in enumerate(_segments(bins[0], examples)):
            alone = model(input_ids=torch.tensor([examples[i]["input_ids"]])).logits[0]
            for leaky in (naive, masked_2d, cached):
                diff = (leaky[0, start : start + n] - alone).abs().max().item()
                if k == 0:
                    assert diff < 1e-5  # the first segment has nothing before it
                else:
                    assert diff > 1e-3, f"segment {k} did not leak: the test could not see it"


def test_lora_model_gradients_match(tiny_dir, tok, examples):
    """Through a peft LoRA wrapper (as the trainer uses it): position_ids reach the base model
    and the gradient of the packed loss sum equals the sum of the separate examples' gradients."""
    from peft import LoraConfig, get_peft_model

    def lora_grads(run):
        model = get_peft_model(
            _model(tiny_dir, "sdpa"),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        run(model)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = collate_packed(examples, [[0, 1, 2, 3]], pad_id_of(tok))

    def packed(model):
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
        causal_lm_loss_sum(out.logits, batch["labels"])[0].backward()

    def separate(model):
        for ex in examples:
            out = model(input_ids=torch.tensor([ex["input_ids"]]))
            causal_lm_loss_sum(out.logits, torch.tensor([ex["labels"]]))[0].backward()

    g_packed, g_sep = lora_grads(packed), lora_grads(separate)
    assert g_packed.keys() == g_sep.keys() and g_packed
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_sep[name], atol=1e-4, rtol=1e-4)

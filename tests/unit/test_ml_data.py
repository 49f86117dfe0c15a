"""Tokenization with loss masking (llmstudio.ml.data) on the tiny model's real tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llmstudio.ml.data import (
    IGNORE_INDEX,
    RowError,
    collate,
    encode_example,
    encode_prompt,
    prompt_text,
    reference_text,
)
from llmstudio.ml.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


def labelled_spans(tok, ex) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    spans, cur = [], []
    for tid, lab in zip(ex["input_ids"], ex["labels"], strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert lab == tid, "a label must be the token at its own position"
            cur.append(lab)
    if cur:
        spans.append(cur)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


def test_prompt_completion_masks_the_prompt(tok):
    row = {"prompt": "Reverse the order of the words: apple river stone\nAnswer:",
           "completion": " stone river apple"}
    ex = encode_example(tok, row, max_len=128)
    prompt_ids = encode_prompt(tok, row)
    n = len(prompt_ids)

    assert ex["input_ids"][0] == tok.bos_token_id  # this tokenizer adds BOS, like Llama's
    assert ex["input_ids"][:n] == prompt_ids  # evaluation conditions on exactly this prefix
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert labelled_spans(tok, ex) == [" stone river apple" + tok.eos_token]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert prompt_text(tok, row) == row["prompt"]
    assert reference_text(row) == " stone river apple"


def test_truncation_keeps_the_start(tok):
    row = {"prompt": "say", "completion": " one two three four five six seven eight nine"}
    full = encode_example(tok, row, max_len=512)
    cut = encode_example(tok, row, max_len=5)
    assert len(full["input_ids"]) > 5
    assert cut["input_ids"] == full["input_ids"][:5]
    assert cut["labels"] == full["labels"][:5]
    assert len(cut["attention_mask"]) == 5


CHAT = {
    "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi you"},
        {"role": "user", "content": "reverse cat dog"},
        {"role": "assistant", "content": " dog  cat\nend"},
    ]
}


def test_chat_labels_only_assistant_turns(tok):
    ex = encode_example(tok, CHAT, max_len=512)
    # exactly the assistant contents + the template's end-of-turn markers
    assert labelled_spans(tok, ex) == ["hi you<|im_end|>\n", " dog  cat\nend<|im_end|>\n"]
    # the rest is the system/user text and role headers, never labelled
    unlabelled = tok.decode(
        [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab == IGNORE_INDEX]
    )
    for text in ("You answer briefly.", "hello there", "reverse cat dog", "<|im_start|>assistant"):
        assert text in unlabelled
    # BOS comes from the template once, not twice
    assert ex["input_ids"][:2].count(tok.bos_token_id) == 1


def test_chat_prompt_and_reference_for_generation(tok):
    text = prompt_text(tok, CHAT)
    assert text.endswith("reverse cat dog<|im_end|>\n<|im_start|>assistant\n")
    assert "hi you" in text and " dog  cat" not in text
    assert reference_text(CHAT) == " dog  cat\nend"
    ids = encode_prompt(tok, CHAT)
    ex = encode_example(tok, CHAT, max_len=512)
    assert ex["input_ids"][: len(ids)] == ids  # generation sees what training saw
    assert ex["labels"][len(ids)] != IGNORE_INDEX  # and the next token is the learned answer


def test_collate_pads_right(tok):
    a = encode_example(tok, {"prompt": "a", "completion": " b"}, 64)
    b = encode_example(tok, {"prompt": "a b c d e", "completion": " f g h"}, 64)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    width = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, width)
    n = len(a["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == a["input_ids"]
    assert batch["input_ids"][0, n:].tolist() == [tok.pad_token_id] * (width - n)
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["attention_mask"][1].tolist() == [1] * width


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"text": "x"}, "'prompt' and 'completion', or 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"prompt": "a", "completion": 3}, "must be strings"),
    ],
)
def test_bad_rows_are_named(tok, row, needle):
    with pytest.raises(RowError, match=None) as err:
        encode_example(tok, row, 64)
    assert needle in str(err.value)


def test_demo_rows_and_spec(tok):
    from llmstudio.demo_data import WORDS, demo_job_spec, word_reversal_rows
    from llmstudio.jobspec import JobSpec

    rows = word_reversal_rows(50, seed=3)
    assert rows == word_reversal_rows(50, seed=3) != word_reversal_rows(50, seed=4)
    for row in rows:
        words = row["prompt"].removeprefix("Reverse the order of the words: ")
        words = words.removesuffix("\nAnswer:").split()
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words)
        assert set(words) <= set(WORDS)
        assert row["completion"] == " " + " ".join(reversed(words))
        ex = encode_example(tok, row, 64)
        assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == (
            row["completion"] + tok.eos_token
        )
    spec = JobSpec.model_validate(demo_job_spec("/models/base", "ds-1", name="demo"))
    assert spec.base_model == "/models/base" and spec.dataset == "ds-1" and spec.name == "demo"
    assert spec.hyperparameters.batch_size == 8 and spec.hyperparameters.max_steps == 80

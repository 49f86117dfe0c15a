"""Tokenization with loss masking (llmstudio.ml.data) on the tiny model's real tokenizer."""

from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from llmstudio.ml.data import (
    IGNORE_INDEX,
    RowError,
    collate,
    encode_example,
    encode_prompt,
    has_reference,
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


def test_chat_masking_token_by_token(tok):
    """Every token inside a system or user turn (header, content, end marker) is -100; every
    token of an assistant turn's content and its end marker is labelled with itself."""
    ex = encode_example(tok, CHAT, max_len=512)
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ex["input_ids"]  # the template renders BOS itself
    # character span of each turn: from its <|im_start|> to just after its <|im_end|>\n
    turns, pos = [], 0
    for m in CHAT["messages"]:
        start = full.index("<|im_start|>", pos)
        end = full.index("<|im_end|>", start) + len("<|im_end|>\n")
        content_at = full.index(m["content"], start)
        turns.append((m["role"], start, content_at, end))
        pos = end
    seen = {"system": 0, "user": 0, "assistant": 0}
    for tid, lab, (a, _b) in zip(ex["input_ids"], ex["labels"], enc["offset_mapping"], strict=True):
        role = next((r for r, s, c, e in turns if s <= a < e), None)
        if role is None:  # BOS, outside every turn
            assert lab == IGNORE_INDEX
            continue
        seen[role] += 1
        _, start, content_at, end = next(t for t in turns if t[1] <= a < t[3])
        if role == "assistant" and a >= content_at:
            assert lab == tid, f"assistant token {tok.decode([tid])!r} not learned"
        else:  # system/user turns entirely, and the assistant role header
            assert lab == IGNORE_INDEX, f"{role} token {tok.decode([tid])!r} is labelled"
    assert all(seen.values())
    # the end-of-turn marker closing each assistant turn is learned
    eos_positions = [i for i, t in enumerate(ex["input_ids"]) if t == tok.eos_token_id]
    learned_eos = [i for i in eos_positions if ex["labels"][i] != IGNORE_INDEX]
    assert len(eos_positions) == 5 and len(learned_eos) == 2


def test_text_rows_learn_every_token_and_end_with_eos(tok):
    row = {"text": "the quick answer is five\nand then some more words"}
    ex = encode_example(tok, row, max_len=512)
    assert ex["input_ids"][0] == tok.bos_token_id  # encoded like any text
    assert ex["input_ids"][-1] == tok.eos_token_id  # EOS appended
    assert ex["labels"] == ex["input_ids"]  # no token masked
    assert tok.decode(ex["input_ids"][1:-1]) == row["text"]
    assert not has_reference(row)
    assert prompt_text(tok, row) == "" and reference_text(row) == ""
    cut = encode_example(tok, row, max_len=4)
    assert cut["labels"] == cut["input_ids"] == ex["input_ids"][:4]
    with pytest.raises(RowError, match="no prompt"):
        encode_prompt(tok, row)


def test_preference_rows_read_as_prompt_plus_chosen(tok):
    row = {"prompt": "Q: color of sky?\nA:", "chosen": " blue", "rejected": " green"}
    ex = encode_example(tok, row, max_len=128)
    same = encode_example(tok, {"prompt": row["prompt"], "completion": " blue"}, max_len=128)
    assert ex == same
    assert labelled_spans(tok, ex) == [" blue" + tok.eos_token]
    assert has_reference(row) and reference_text(row) == " blue"
    assert prompt_text(tok, row) == row["prompt"]
    assert encode_prompt(tok, row) == ex["input_ids"][: len(encode_prompt(tok, row))]


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
        ({"body": "x"}, "'prompt' and 'completion', or 'messages', or 'text'"),
        ({"text": 3}, "'text' must be strings"),
        ({"prompt": "a", "chosen": "b", "rejected": None}, "must be strings"),
        ({"prompt": "a"}, "got keys ['prompt']"),
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


# -- evaluation of text and preference rows (llmstudio.ml.evaluation) --------------------------


@pytest.fixture(scope="module")
def tiny_dir(tok):
    return tok.name_or_path


def test_evaluate_text_rows_scores_loss_only(tok, tiny_dir):
    from llmstudio.ml.evaluation import evaluate_model

    rows = [{"text": "hello there how are you"}, {"text": "the river and the stone"}]
    report = evaluate_model(tiny_dir, rows, max_new_tokens=2, batch_size=2)
    # every token but the first of each row is scored (BOS + words + EOS, shifted by one)
    want = sum(len(encode_example(tok, r, 1024)["input_ids"]) - 1 for r in rows)
    assert report["loss_tokens"] == want
    assert math.isfinite(report["eval_loss"])
    assert report["exact_match"] is None and report["samples"] == 0 and report["examples"] == []


def test_evaluate_preference_rows_uses_chosen_as_reference(tok, tiny_dir):
    from llmstudio.ml.evaluation import evaluate_model

    pref = {"prompt": "Q: color of sky?\nA:", "chosen": " blue", "rejected": " green"}
    rows = [{"text": "hello there"}, pref, {"prompt": "say:", "completion": " apple"}]
    report = evaluate_model(tiny_dir, rows, max_new_tokens=2, batch_size=2)
    assert report["samples"] == 2  # the text row is not generated
    assert [e["reference"] for e in report["examples"]] == [" blue", " apple"]
    assert report["examples"][0]["prompt"] == pref["prompt"]
    assert report["exact_match"] in (0.0, 0.5, 1.0)
    # loss over: all of the text row, chosen + EOS of the preference row, completion + EOS
    want = sum(
        sum(1 for t in encode_example(tok, r, 1024)["labels"][1:] if t != IGNORE_INDEX)
        for r in rows
    )
    assert report["loss_tokens"] == want


# -- the BOS convention: one BOS first when the tokenizer has one, whatever its default encoding

ROW = {"prompt": "Reverse the order of the words: apple river\nAnswer:",
       "completion": " river apple"}


def _without_bos_in_encoding(model_dir, **kwargs):
    """The tiny tokenizer with a post-processor that adds nothing (as SmolLM2's and Qwen's)."""
    from tokenizers import processors

    t = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    t.backend_tokenizer.post_processor = processors.Sequence([])
    return t


def _text_ids(t, text: str) -> list[int]:
    return t(text, add_special_tokens=False)["input_ids"]


def test_prompt_gets_one_bos_where_the_tokenizer_adds_it(tok):
    ex = encode_example(tok, ROW, 64)
    assert ex["input_ids"][:2] == [tok.bos_token_id, *_text_ids(tok, "Reverse")[:1]]
    assert ex["input_ids"].count(tok.bos_token_id) == 1


def test_prompt_gets_bos_where_the_tokenizer_has_one_but_adds_none(tiny_dir):
    t = _without_bos_in_encoding(tiny_dir)
    assert t("a")["input_ids"][0] != t.bos_token_id  # the tokenizer itself adds none
    ex = encode_example(t, ROW, 64)
    prompt = _text_ids(t, ROW["prompt"])
    assert ex["input_ids"][: len(prompt) + 1] == [t.bos_token_id, *prompt]
    assert encode_prompt(t, ROW) == [t.bos_token_id, *prompt]  # evaluation sees the same
    assert ex["labels"][: len(prompt) + 1] == [IGNORE_INDEX] * (len(prompt) + 1)
    preference = {"prompt": ROW["prompt"], "chosen": ROW["completion"], "rejected": " no"}
    assert encode_example(t, preference, 64) == ex


def test_no_bos_where_the_tokenizer_has_none(tiny_dir):
    t = _without_bos_in_encoding(tiny_dir, bos_token=None)
    assert t.bos_token_id is None
    ex = encode_example(t, ROW, 64)
    assert ex["input_ids"][: len(_text_ids(t, ROW["prompt"]))] == _text_ids(t, ROW["prompt"])
    assert encode_prompt(t, ROW) == _text_ids(t, ROW["prompt"])


def test_chat_gets_bos_once_whether_or_not_the_template_renders_it(tiny_dir):
    t = _without_bos_in_encoding(tiny_dir)
    with_bos = encode_example(t, CHAT, 512)  # the tiny template starts with {{ bos_token }}
    t.chat_template = t.chat_template.removeprefix("{{ bos_token }}")
    assert not t.apply_chat_template(CHAT["messages"], tokenize=False).startswith(t.bos_token)
    without = encode_example(t, CHAT, 512)
    for ex in (with_bos, without):
        assert ex["input_ids"][0] == t.bos_token_id
        assert ex["input_ids"].count(t.bos_token_id) == 1
    assert without == with_bos

"""Dataset domain logic: line-by-line validation, normalization, deterministic split."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.dataset import core


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


def pc(i: int) -> dict:
    return {"prompt": f"question {i}", "completion": f" answer {i}"}


def rejected(content: bytes, name: str = "ds", filename: str = "data.jsonl", **kw) -> core.Rejection:
    with pytest.raises(core.Rejected) as e:
        core.prepare(name, content, filename, **kw)
    return e.value.rejection


# -- normalization --------------------------------------------------------------------------------


def test_prompt_completion_rows_are_canonical_and_drop_extra_fields():
    p = core.prepare("ds", jsonl({"completion": " b", "id": 7, "prompt": "a"}, pc(1)), "d.jsonl")
    assert p.format == core.PROMPT_COMPLETION
    assert p.rows == [
        '{"completion":" b","prompt":"a"}',
        '{"completion":" answer 1","prompt":"question 1"}',
    ]
    assert p.sha256 == hashlib.sha256(("\n".join(p.rows) + "\n").encode()).hexdigest()


def test_sha256_ignores_formatting_key_order_and_blank_lines():
    a = jsonl(pc(1), pc(2))
    b = (
        b'\n{ "completion" : " answer 1",   "prompt": "question 1" }\r\n\n'
        b'{"prompt":"question 2","completion":" answer 2","note":"x"}'
    )
    assert core.prepare("ds", a, "a").sha256 == core.prepare("ds", b, "b").sha256
    assert core.prepare("ds", a, "a").sha256 != core.prepare("ds", jsonl(pc(1), pc(3)), "a").sha256


def test_messages_rows_keep_role_and_content_only_and_non_ascii_text():
    row = {"messages": [
        {"role": "system", "content": "Sei gentile."},
        {"role": "user", "content": "Ciao, come stai? 你好", "name": "bob"},
        {"role": "assistant", "content": "Bene!"},
    ]}
    p = core.prepare("chat", jsonl(row), "chat.jsonl")
    assert p.format == core.MESSAGES
    assert json.loads(p.rows[0]) == {"messages": [
        {"role": "system", "content": "Sei gentile."},
        {"role": "user", "content": "Ciao, come stai? 你好"},
        {"role": "assistant", "content": "Bene!"},
    ]}
    assert "你好" in p.files["train"].decode("utf-8")


def test_byte_order_mark_on_first_line_is_accepted():
    assert core.prepare("ds", b"\xef\xbb\xbf" + jsonl(pc(1)), "bom.jsonl").rows == [
        core.canonical(pc(1))
    ]


# -- errors name the file, line and field ---------------------------------------------------------


def test_every_line_is_checked_and_errors_name_line_and_field():
    content = jsonl(
        pc(1),
        '{"prompt": "x" "completion": "y"}',
        {"prompt": "only"},
        {"prompt": "", "completion": 3},
        pc(5),
        [1, 2],
        {"body": "hello"},
    )
    r = rejected(content)
    assert r.errors == [
        "data.jsonl:2: invalid JSON: Expecting ',' delimiter (col 16)",
        "data.jsonl:3: field 'completion': missing",
        "data.jsonl:4: field 'prompt': must not be empty",
        "data.jsonl:4: field 'completion': must be a string, got number",
        "data.jsonl:6: expected a JSON object, got array",
        "data.jsonl:7: row must have 'prompt' and 'completion', or 'messages', or 'text', or "
        "'prompt', 'chosen' and 'rejected'; got keys ['body']",
    ]
    assert r.invalid_lines == 5 and r.total_errors == 6


def test_messages_errors():
    r = rejected(jsonl(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": []},
        {"messages": [{"role": "assistant"}, "hi"]},
        {"messages": [{"role": "assistant", "content": "  "}], "prompt": "p"},
    ), filename="chat.jsonl")
    assert r.errors == [
        "chat.jsonl:1: field 'messages[1].role': must be one of system, user, assistant",
        "chat.jsonl:2: field 'messages': needs at least one assistant message",
        "chat.jsonl:3: field 'messages': must be a non-empty array of {role, content}",
        "chat.jsonl:4: field 'messages[0].content': missing",
        "chat.jsonl:4: field 'messages[1]': must be an object, got string",
        "chat.jsonl:5: row mixes 'messages' with 'prompt'/'completion': use one schema",
    ]


def test_text_rows_for_continued_pretraining():
    p = core.prepare("corpus", jsonl({"text": "Once upon a time", "source": "x"},
                                     {"text": "  é ünïcode\nline two "}), "t.jsonl")
    assert p.format == core.TEXT == "text"
    assert p.rows == ['{"text":"Once upon a time"}', '{"text":"  é ünïcode\\nline two "}']
    assert p.counts == {"train": 1, "validation": 1}
    r = rejected(jsonl({"text": ""}, {"text": 3}, {"text": "ok"}), filename="t.jsonl")
    assert r.errors == [
        "t.jsonl:1: field 'text': must not be empty",
        "t.jsonl:2: field 'text': must be a string, got number",
    ]


def test_preference_rows_are_canonical_and_checked():
    row = {"rejected": " green", "prompt": "Q: sky?\nA:", "chosen": " blue", "score": 1}
    p = core.prepare("prefs", jsonl(row, {"prompt": "a", "chosen": "b", "rejected": "c"}), "p.jsonl")
    assert p.format == core.PREFERENCE == "preference"
    assert p.rows[0] == '{"chosen":" blue","prompt":"Q: sky?\\nA:","rejected":" green"}'
    r = rejected(jsonl(
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": "b", "rejected": ["c"]},
        {"prompt": " ", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "a", "completion": "b", "chosen": "c", "rejected": "d"},
        {"prompt": "a", "chosen": "b", "rejected": "c"},
    ), filename="p.jsonl")
    assert r.errors == [
        "p.jsonl:1: field 'rejected': missing",
        "p.jsonl:2: field 'rejected': must be a string, got array",
        "p.jsonl:3: field 'prompt': must not be empty",
        "p.jsonl:4: field 'rejected': must differ from 'chosen'",
        "p.jsonl:5: row mixes 'chosen'/'rejected' with 'completion': use one schema",
    ]
    assert r.invalid_lines == 5


@pytest.mark.parametrize(
    ("first", "second", "want"),
    [
        ({"text": "t"}, pc(1), "a prompt_completion row in a file of text rows (line 1)"),
        (pc(1), {"text": "t"}, "a text row in a file of prompt_completion rows (line 1)"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, pc(1),
         "a prompt_completion row in a file of preference rows (line 1)"),
        (pc(1), {"prompt": "a", "chosen": "b", "rejected": "c"},
         "a preference row in a file of prompt_completion rows (line 1)"),
    ],
)
def test_new_schemas_do_not_mix(first, second, want):
    r = rejected(jsonl(first, second), filename="m.jsonl")
    assert r.errors == [f"m.jsonl:2: mixed schemas: {want}"]


@pytest.mark.parametrize(
    ("objective", "fmt", "ok"),
    [
        ("sft", "prompt_completion", True), ("sft", "messages", True), ("sft", "text", False),
        ("pretrain", "text", True), ("pretrain", "messages", False),
        ("dpo", "preference", True), ("orpo", "preference", True),
        ("dpo", "prompt_completion", False), ("orpo", "messages", False),
        ("sft", "preference", False),
    ],
)
def test_objective_needs_a_matching_dataset_format(objective, fmt, ok):
    err = core.objective_error(objective, fmt)
    assert (err is None) == ok
    if not ok:
        assert err.startswith(f"objective {objective} needs a dataset of format ")
        assert err.endswith(f"this dataset is {fmt}")


def test_mixed_schemas_name_the_line_and_the_line_that_set_the_schema():
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    r = rejected(jsonl("", pc(1), pc(2), chat), filename="mix.jsonl")
    assert r.errors == [
        "mix.jsonl:4: mixed schemas: a messages row in a file of prompt_completion rows (line 2)"
    ]


def test_blank_lines_still_count_for_line_numbers():
    r = rejected(b"\n   \n" + jsonl(pc(1), "{oops"))
    assert r.errors == [
        "data.jsonl:4: invalid JSON: Expecting property name enclosed in double quotes (col 2)"
    ]


def test_invalid_utf8_and_lone_surrogates_are_errors():
    r = rejected(jsonl(pc(1)) + b'{"prompt": "caf\xe9", "completion": "x"}\n'
                 + b'{"prompt": "\\ud800", "completion": "x"}\n')
    assert r.errors == [
        "data.jsonl:2: not valid UTF-8 (byte 16)",
        "data.jsonl:3: field 'prompt': not valid Unicode text (lone surrogate)",
    ]


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_empty_file_is_an_error(content):
    r = rejected(content, filename="empty.jsonl")
    assert r.errors == ["empty.jsonl: empty file: no rows"]
    assert r.invalid_lines == 0
    assert r.summary() == "empty.jsonl: empty file: no rows"


@pytest.mark.parametrize("name", ["a", "my-data_v1.2", "A" * 128, "0.jsonl"])
def test_valid_names(name):
    assert core.name_error(name) is None


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", ".hidden", "-x", "with space",
                                  "A" * 129, "x*", "ünï", "ok\n"])
def test_invalid_names(name):
    assert core.name_error(name).startswith("name: must")


def test_invalid_name_and_fraction_are_reported_with_the_line_errors():
    r = rejected(jsonl(pc(1), "nope"), name="../etc", validation_fraction=1.0)
    assert [e.split(":")[0] for e in r.errors] == ["name", "validation_fraction", "data.jsonl"]
    assert r.invalid_lines == 1


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0, float("nan"), float("inf")])
def test_validation_fraction_must_be_in_0_1(fraction):
    assert "validation_fraction" in core.fraction_error(fraction)


def test_summary_counts_lines_and_names_first_errors_and_errors_are_capped():
    content = jsonl(pc(0), *["{bad"] * 30)
    r = rejected(content)
    assert r.invalid_lines == 30 and r.total_errors == 30
    assert len(r.errors) == core.MAX_REPORTED_ERRORS
    assert r.errors[0].startswith("data.jsonl:2: invalid JSON")
    assert r.summary() == (
        "30 invalid lines; "
        + "; ".join(f"data.jsonl:{n}: invalid JSON: Expecting property name enclosed in double "
                    "quotes (col 2)" for n in (2, 3, 4))
        + "; and 27 more"
    )


def test_summary_of_one_error():
    assert rejected(jsonl(pc(0), {"prompt": "p"})).summary() == (
        "1 invalid line; data.jsonl:2: field 'completion': missing"
    )


# -- split ------------------------------------------------------------------------------------


def test_split_follows_the_hash_threshold_and_is_deterministic():
    rows = [core.canonical(pc(i)) for i in range(1000)]
    sides = core.split_rows(rows, 0.2, seed=7)
    expected = [
        "validation"
        if int(hashlib.sha256(f"7:{r}".encode()).hexdigest(), 16) / 2**256 < 0.2 else "train"
        for r in rows
    ]
    assert sides == expected == core.split_rows(rows, 0.2, seed=7)
    assert 150 < sides.count("validation") < 250
    assert core.split_rows(rows, 0.2, seed=8) != sides


def test_prepare_splits_in_upload_order_with_default_fraction_and_seed():
    content = jsonl(*[pc(i) for i in range(200)])
    p = core.prepare("ds", content, "d.jsonl")
    sides = core.split_rows(p.rows, core.DEFAULT_VALIDATION_FRACTION, 0)
    for split in core.SPLITS:
        expected = [r for r, s in zip(p.rows, sides, strict=True) if s == split]
        assert p.files[split].decode().splitlines() == expected
        assert p.counts[split] == len(expected)
        assert p.split_sha256[split] == hashlib.sha256(p.files[split]).hexdigest()
    assert p.counts["train"] + p.counts["validation"] == 200
    assert 5 < p.counts["validation"] < 40


def test_two_rows_always_give_one_validation_and_one_train_row():
    rows = [core.canonical(pc(1)), core.canonical(pc(2))]
    for fraction in (1e-9, 0.999999):
        for seed in range(20):
            assert sorted(core.split_rows(rows, fraction, seed)) == ["train", "validation"]


def test_moved_row_is_the_one_nearest_the_threshold():
    rows = [core.canonical(pc(i)) for i in range(10)]
    scores = [core.split_score(3, r) for r in rows]
    sides = core.split_rows(rows, 1e-12, seed=3)
    assert sides.count("validation") == 1
    assert sides.index("validation") == scores.index(min(scores))


def test_single_row_is_training_data():
    assert core.prepare("ds", jsonl(pc(1)), "d", validation_fraction=0.99).counts == {
        "train": 1, "validation": 0}


def test_duplicate_rows_land_on_the_same_side():
    rows = [core.canonical(pc(i % 7)) for i in range(70)]
    sides = core.split_rows(rows, 0.3, seed=1)
    for i in range(7):
        assert len({sides[j] for j in range(i, 70, 7)}) == 1


def test_split_prefix_differs_by_split_parameters():
    sha = "ab" * 32
    assert core.split_prefix(sha, 0, 0) == core.split_prefix(sha, 0.1, 0)
    assert core.split_prefix(sha, 0, 0) == f"datasets/{sha}/seed0-val0.1"
    assert len({core.split_prefix(sha, 0.1, 0), core.split_prefix(sha, 0.2, 0),
                core.split_prefix(sha, 0.1, 1)}) == 3


def test_request_fingerprint_ignores_nothing_but_the_filename_and_default_fraction():
    base = core.request_fingerprint("ds", b"x", 0, 0)
    assert base == core.request_fingerprint("ds", b"x", 0.1, 0)
    assert len({base, core.request_fingerprint("ds2", b"x", 0, 0),
                core.request_fingerprint("ds", b"y", 0, 0),
                core.request_fingerprint("ds", b"x", 0.2, 0),
                core.request_fingerprint("ds", b"x", 0, 1)}) == 5

"""The shared JSONL parser (moved from the trainer's and the evaluator's core)."""

from __future__ import annotations

import pytest

from llmstudio.jsonl import parse_jsonl


def test_rows_in_order_blank_lines_skipped():
    raw = b'{"prompt": "a", "completion": "b"}\n\n   \n{"messages": []}\n'
    assert parse_jsonl(raw, "s3://x/train") == [
        {"prompt": "a", "completion": "b"}, {"messages": []}]
    assert parse_jsonl(b'{"a": 1}\n\n{"b": 2}', "v.jsonl") == [{"a": 1}, {"b": 2}]


def test_bad_line_names_source_and_line():
    with pytest.raises(ValueError, match=r"^s3://x/train:2: not valid JSON"):
        parse_jsonl(b'{"a": 1}\n{oops\n', "s3://x/train")
    # line numbers count blank lines too
    with pytest.raises(ValueError, match=r"^v\.jsonl:3: not valid JSON"):
        parse_jsonl(b'{"a": 1}\n\nnope', "v.jsonl")


def test_non_object_line():
    with pytest.raises(ValueError, match=r"^train:1: expected a JSON object, got list$"):
        parse_jsonl(b"[1, 2]\n", "train")
    with pytest.raises(ValueError, match=r"^train:2: expected a JSON object, got int$"):
        parse_jsonl(b'{"a": 1}\n3\n', "train")


@pytest.mark.parametrize("raw", [b"", b"\n", b"  \n\n"])
def test_empty_is_an_error(raw):
    with pytest.raises(ValueError, match=r"^train: no rows$"):
        parse_jsonl(raw, "train")

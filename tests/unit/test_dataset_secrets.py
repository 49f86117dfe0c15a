"""Secret scanner: every provider rule finds its (fake) token with its kind, and redaction removes
it; hashes, UUIDs, blobs, placeholders and ordinary text are left alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from services.dataset.pii import SECRET, Finding, find_pii, redact
from services.dataset.secrets import RULES, SECRET_KINDS, SecretFinding, find_secrets

FIXTURES = Path(__file__).parent.parent / "fixtures"


def load(name: str) -> list[dict]:
    with (FIXTURES / "secrets" / name).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


TOKENS = load("tokens.jsonl")
NEGATIVES = load("negatives.jsonl")


def kinds_and_values(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start:f.end]) for f in find_secrets(text)]


def test_fixtures_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_secret_fixtures", FIXTURES / "secrets" / "make_secret_fixtures.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.main(tmp_path)
    for name in ("tokens.jsonl", "negatives.jsonl"):
        assert (tmp_path / name).read_bytes() == (FIXTURES / "secrets" / name).read_bytes(), name


def test_every_rule_has_a_fixture_its_plugin_detects():
    undetected = [
        (rule.kind, type(rule.detector).__name__) for rule in RULES
        if not any(row["kind"] == rule.kind and list(rule.detector.analyze_string(row["text"]))
                   for row in TOKENS)
    ]
    assert undetected == []
    assert {row["kind"] for row in TOKENS} == set(SECRET_KINDS)


@pytest.mark.parametrize("row", TOKENS, ids=[f"{r['kind']}:{r['text'][:24]}" for r in TOKENS])
def test_each_token_is_found_whole_with_its_kind_and_nothing_else(row):
    assert kinds_and_values(row["text"]) == [(row["kind"], row["value"])]


@pytest.mark.parametrize("row", TOKENS, ids=[f"{r['kind']}:{r['text'][:24]}" for r in TOKENS])
def test_each_token_is_a_secret_finding_and_redacted(row):
    text, value = row["text"], row["value"]
    start = text.index(value)
    assert Finding(SECRET, start, start + len(value)) in find_pii(text)
    redacted, counts = redact(text)
    assert redacted == text.replace(value, "[SECRET]")
    assert counts == {SECRET: 1}


@pytest.mark.parametrize("row", NEGATIVES, ids=[r["why"] for r in NEGATIVES])
def test_negatives_have_no_findings(row):
    assert find_secrets(row["text"]) == []
    assert find_pii(row["text"]) == []


def test_ordinary_rows_of_the_pii_fixture_have_no_secret_findings():
    with (FIXTURES / "pii" / "clean.jsonl").open(encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    assert [t for t in texts if find_secrets(t)] == []


def test_a_token_inside_a_longer_string_is_not_a_key():
    sid = next(row["value"] for row in TOKENS if row["kind"] == "twilio_api_key")
    assert find_secrets(f"blob x{sid} end") == []
    assert find_secrets(f"blob {sid} end") == [SecretFinding("twilio_api_key", 5, 5 + len(sid))]


def test_a_jwt_is_redacted_with_its_signature():
    row = next(row for row in TOKENS if row["kind"] == "jwt")
    assert row["value"].count(".") == 2 and not row["value"].endswith(".")
    assert kinds_and_values(row["text"]) == [("jwt", row["value"])]


def test_several_secrets_in_one_row_are_each_found_in_order():
    rows = TOKENS[:8]
    text = "\n".join(row["text"] for row in rows)
    assert kinds_and_values(text) == [(row["kind"], row["value"]) for row in rows]

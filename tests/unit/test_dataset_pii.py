"""PII scanner: full recall on seeded rows of every type, zero findings on 10,000 ordinary rows."""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from services.dataset.pii import PII_TYPES, Finding, find_pii, redact

FIXTURES = Path(__file__).parent.parent / "fixtures" / "pii"


def load(name: str) -> list[dict]:
    with (FIXTURES / name).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


SEEDED = load("seeded.jsonl")
CLEAN = load("clean.jsonl")


def found(text: str) -> set[tuple[str, str]]:
    return {(f.type, text[f.start:f.end]) for f in find_pii(text)}


def test_fixtures_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_pii_fixtures",
                                                  FIXTURES / "make_pii_fixtures.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.main(tmp_path)
    for name in ("seeded.jsonl", "clean.jsonl"):
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name
    assert len(CLEAN) == 10_000
    assert (FIXTURES / "clean.jsonl").stat().st_size < 2_000_000


def test_seeded_fixture_covers_every_type_several_times():
    per_type = Counter(e["type"] for row in SEEDED for e in row["expected"])
    assert set(per_type) == set(PII_TYPES)
    assert min(per_type.values()) >= 15, per_type


def test_every_seeded_value_is_found_with_its_type():
    missed = [(row["text"], e) for row in SEEDED for e in row["expected"]
              if (e["type"], e["value"]) not in found(row["text"])]
    assert missed == []


def test_seeded_rows_have_no_findings_beyond_the_expected_ones():
    # the rows surround the values with dates, prices and ids that must stay
    extra = [(row["text"], found(row["text"]) - {(e["type"], e["value"]) for e in row["expected"]})
             for row in SEEDED]
    assert [e for e in extra if e[1]] == []


def test_clean_rows_have_zero_findings():
    hits = [(row["text"], found(row["text"])) for row in CLEAN if find_pii(row["text"])]
    assert hits == []


def test_redaction_removes_every_value_and_counts_each_type():
    totals: Counter = Counter()
    for row in SEEDED:
        redacted, counts = redact(row["text"])
        totals += counts
        for expected in row["expected"]:
            assert expected["value"] not in redacted
            assert f"[{expected['type'].upper()}]" in redacted
    assert totals == Counter(e["type"] for row in SEEDED for e in row["expected"])


def test_redact_replaces_findings_with_type_placeholders():
    text = "Mail ana@example.com or call +44 20 7946 0958 from 10.20.30.40, SSN 123-45-6789."
    assert redact(text) == (
        "Mail [EMAIL] or call [PHONE] from [IP_ADDRESS], SSN [NATIONAL_ID].",
        Counter({"email": 1, "phone": 1, "ip_address": 1, "national_id": 1}),
    )
    assert redact("nothing to see on 2024-03-15") == ("nothing to see on 2024-03-15", Counter())


def test_findings_are_sorted_and_disjoint():
    text = "a@example.com 4111 1111 1111 1111 b@example.org DE89370400440532013000 "
    findings = find_pii(text * 3)
    assert [f.type for f in findings] == ["email", "credit_card", "email", "iban"] * 3
    assert all(a.end <= b.start for a, b in itertools.pairwise(findings))


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # Luhn fails
    "card 4111111111111112",
    "card 9400 1000 0000 0004",  # Luhn holds, no issuer uses 94
    "IBAN DE88 3704 0044 0532 0130 00",  # mod-97 fails
    "IBAN GB82WEST12345698765433",
    "IBAN DE89 3704 0044 0532 0130 0",  # too short for DE
    "SSN 000-12-3456 666-12-3456 912-34-5678 123-00-4567 123-45-0000",
    "NINO GB123456A",  # unused prefix
    "DNI 12345678A",  # check letter is Z
    "codice RSSMRA85T10A562T",  # check character is S
    "v1.2.3.4, version 1.2.3.4, release 10.0.0.1, 1.2.3.4.5, 256.1.1.1",
    "127.0.0.1, 0.0.0.0, ::1, 255.255.255.0",
    "std::vector, Add::add, x[1::2], 12:30:45, 00:1A:2B:3C:4D:5E",
    "x@self.weight q@k.transpose(-1) git@github.com:org/repo.git user@localhost",
    "password: ********, password=${DB_PASSWORD}, api_key = settings.API_KEY",
    "secret_name: prod-db-credentials-v2, token: 2024-03-15, password=correcthorse",
    "postgres://user:password@localhost/db",
    "$1,299.99 on 2024-03-15 at 14:30; ISBN 978-3-16-148410-0; 3.14159265358979",
    "energy 4.359 744 722 2071 e-18 J, charge 1.602 176 6208",  # SI digit groups, not phones
    "INT_MAX = +2147483647; offset +35236450.6",  # no country code 214; a signed decimal
    '"oracle-ee": "11.2.0.4.v3", multicast 224.0.0.1',
    ":doi:`10.1137/10081232X`",  # ends like a DNI
    'if line == "-----BEGIN RSA PRIVATE KEY-----" and not seen_end:',
    "def load(private_key: PKCS7PrivateKeyTypes, password: bytes | None = None):",
])
def test_near_misses_are_not_flagged(text):
    assert find_pii(text) == []


@pytest.mark.parametrize(("text", "pii_type", "value"), [
    ("ip 1.2.3.4", "ip_address", "1.2.3.4"),  # a dotted quad without a version word
    ("[2001:db8::1]:8080", "ip_address", "2001:db8::1"),
    ("::ffff:192.0.2.1", "ip_address", "::ffff:192.0.2.1"),
    ("4111 1111 1111 1111 123", "credit_card", "4111 1111 1111 1111 123"),  # with its CVV
    ("5555-5555-5555-4444", "credit_card", "5555-5555-5555-4444"),
    ("call 1-800-555-0199", "phone", "1-800-555-0199"),
    ("+1 (555) 123-4567", "phone", "+1 (555) 123-4567"),
    ("NINO AB 12 34 56 C", "national_id", "AB 12 34 56 C"),
    ("NIE X1234567L", "national_id", "X1234567L"),
    ('"password": "Summer2024!"', "secret", "Summer2024!"),
    ("export API_KEY=9f8a7b6c5d4e3f2a1b0c.", "secret", "9f8a7b6c5d4e3f2a1b0c"),
    ("+33.1.23.45.67.89", "phone", "+33.1.23.45.67.89"),
])
def test_edge_forms_are_found(text, pii_type, value):
    assert found(text) == {(pii_type, value)}


def test_overlaps_keep_the_more_specific_type():
    # the password in a URL would otherwise also read as an e-mail address
    url = "postgres://admin:s3cr3tP4ss@db.example.com:5432/app"
    assert find_pii(url) == [Finding("secret", url.index("s3cr3t"), url.index("@db"))]
    # an IBAN holds a digit run that could pass for a card or a phone number
    iban = "NO9386011117947"
    assert found(f"account {iban}") == {("iban", iban)}
    jwt = ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwiaWF0IjoxNTE2MjM5MDIyfQ."
           "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
    assert found(f"Authorization: Bearer {jwt}") == {("secret", jwt)}


def test_pem_private_key_block_is_one_secret():
    block = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy\n"
             "0AHB7MhgwMbRvI0MBZhpF5YrDhZw0DpKkjxV93c\n-----END RSA PRIVATE KEY-----")
    text = f"key.pem:\n{block}\nDone on 2024-03-15."
    assert find_pii(text) == [Finding("secret", text.index(block), text.index(block) + len(block))]
    escaped = block.replace("\n", "\\n")  # as written inside a string literal in code
    assert found(f'KEY = "{escaped}"') == {("secret", escaped)}
    cut_short = block[:block.index("-----END")].rstrip()
    assert found(cut_short) == {("secret", cut_short)}

"""The fast ingest finds exactly what the reference ingest found: duplicate, near-duplicate and
PII findings on the fixtures and on a generated bench-like sample are compared with a frozen
expectation, computed by the pure-Python implementation before the ingest was made fast
(`python -m tests.unit.test_dataset_ingest_equivalence` wrote it, at commit ade12fb)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from services.dataset import ingest
from services.dataset.dedup import ExactDuplicates, NearDuplicates
from services.dataset.pii import find_pii

FIXTURES = Path(__file__).parent.parent / "fixtures"
EXPECTED = FIXTURES / "ingest_equivalence" / "expected.json"
PII_FIXTURES = ("seeded.jsonl", "clean.jsonl")
DATASET_FIXTURES = ("alpaca.jsonl", "openai_chat.jsonl", "preference.jsonl",
                    "preference_conversational.jsonl", "prompt_completion.jsonl",
                    "sharegpt.jsonl", "text.jsonl")
WORDS = ("the model learns from data while engineers tune adapters on small batches of text and "
         "evaluate the loss on held out rows before they register a version for review by the "
         "platform team who approve promotion to production after checks pass").split()
SEEDED_VALUES = ("reach jane.doe@example.com", "call +44 20 7946 0958", "card 4111 1111 1111 1111",
                 "IBAN GB82 WEST 1234 5698 7654 32", "host 203.0.113.7", "SSN 123-45-6789",
                 "AKIAIOSFODNN7EXAMPLE", "password=Zq8#rT2!vL9x", "(555) 123-4567",
                 "Straße ＡＢＣ ﬁle 東京タワーに行きました",
                 "v1.2.3.4 build 2001:db8::ff00:42:8329")


def sample_rows(count: int = 3000, seed: int = 0) -> list[dict]:
    """Prompt/completion rows like the bench's (random words, 1% exact copies), plus edited
    copies (near duplicates: a word changed, case and spacing, punctuation), rows holding PII
    of every kind, and non-ASCII text (compatibility forms, CJK)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for number in range(count):
        roll = rng.random()
        if rows and roll < 0.02:
            rows.append(dict(rng.choice(rows)))
        elif rows and roll < 0.06:
            source = rng.choice(rows)
            words = source["completion"].split(" ")
            edit = rng.randrange(3)
            if edit == 0:
                words[rng.randrange(len(words))] = "zebra"
            completion = " ".join(words)
            if edit == 1:
                completion = "  " + completion.upper().replace(" ", "\n", 3)
            if edit == 2:
                completion = completion.replace(" ", ", ", 4) + "!"
            rows.append({"prompt": source["prompt"], "completion": completion})
        else:
            length = rng.randint(5, 120)
            prompt = " ".join(rng.choice(WORDS) for _ in range(length // 3)) + f" #{number}?"
            completion = " ".join(rng.choice(WORDS) for _ in range(length))
            if roll > 0.9:
                completion += " " + rng.choice(SEEDED_VALUES)
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def texts_of(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def pii_findings(texts: list[str]) -> list[list]:
    return [[row, f.type, f.start, f.end]
            for row, text in enumerate(texts) for f in find_pii(text)]


def duplicate_findings(texts: list[str]) -> dict[str, list]:
    exact, near = ExactDuplicates(), NearDuplicates()
    for text in texts:
        exact.add(text)
        near.add(text)
    return {"exact": sorted([row, first] for row, first in exact.finish().items()),
            "near": [list(finding) for finding in near.finish()]}


def ingest_findings(path: Path, workdir: Path, limits: ingest.Limits = ingest.Limits(),
                    **options) -> dict:
    """What an ingest reports about duplicates and PII (not length outliers: another rule)."""
    report = ingest.ingest(path, ingest.Options(name="equivalence", **options), workdir,
                           limits).report
    kinds = ("duplicate", "near_duplicate") + tuple(f"pii:{t}" for t in report["pii_counts"])
    return {
        "counts": {key: report[key] for key in ("rows", "exact_duplicates", "near_duplicates",
                                                "pii_rows", "pii_counts", "removed")},
        "findings": [f for f in report["findings"] if f["kind"] in kinds],
    }


def findings(workdir: Path) -> dict:
    sample = sample_rows()
    sample_path = workdir / "sample.jsonl"
    sample_path.write_text("".join(json.dumps(row) + "\n" for row in sample), encoding="utf-8")
    sample_texts = [ingest.row_text(row) for row in sample]
    fields = [row[key] for row in sample for key in sorted(row)]
    found: dict = {"pii": {name: pii_findings(texts_of(FIXTURES / "pii" / name))
                           for name in PII_FIXTURES},
                   "duplicates": {name: duplicate_findings(texts_of(FIXTURES / "pii" / name))
                                  for name in PII_FIXTURES}}
    found["pii"]["sample fields"] = pii_findings(fields)
    found["duplicates"]["sample"] = duplicate_findings(sample_texts)
    found["ingest"] = {
        "sample": ingest_findings(sample_path, workdir / "plain"),
        "sample, cleaned": ingest_findings(
            sample_path, workdir / "cleaned",
            quality=ingest.Quality(remove_near_duplicates=True, redact_pii=True)),
    }
    for name in DATASET_FIXTURES:
        found["ingest"][name] = ingest_findings(FIXTURES / "datasets" / name, workdir / name)
    return found


def test_findings_equal_the_reference_implementations(tmp_path):
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    got = json.loads(json.dumps(findings(tmp_path)))  # tuples as lists, as stored
    for section in expected:
        for name in expected[section]:
            assert got[section][name] == expected[section][name], (section, name)
    assert got == expected


def test_the_duplicate_worker_process_finds_the_same(tmp_path):
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))["ingest"]["sample, cleaned"]
    sample_path = tmp_path / "sample.jsonl"
    sample_path.write_text("".join(json.dumps(row) + "\n" for row in sample_rows()),
                           encoding="utf-8")
    in_worker = ingest.Limits(duplicate_worker_min_bytes=0)
    got = ingest_findings(sample_path, tmp_path / "work", in_worker,
                          quality=ingest.Quality(remove_near_duplicates=True, redact_pii=True))
    assert json.loads(json.dumps(got)) == expected


def test_the_sample_exercises_every_finding():
    expected = json.loads(EXPECTED.read_text(encoding="utf-8"))
    sample = expected["duplicates"]["sample"]
    assert len(sample["exact"]) > 20 and len(sample["near"]) > 20
    assert {f[1] for f in expected["pii"]["sample fields"]} >= {
        "email", "phone", "credit_card", "iban", "ip_address", "national_id", "secret"}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(findings(Path(tmp)), indent=None, sort_keys=True) + "\n",
                            encoding="utf-8")

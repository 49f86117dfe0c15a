"""The ingest pipeline on real files: validation with file/line/field errors, policy verdicts,
canonical content addressing, deterministic three-way splits, dedup and PII redaction, limits."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from services.dataset import core, ingest
from services.dataset.pii import PII_TYPES

SECRET_EMAIL = "jane.doe@example.com"


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)


def pc(i: int) -> dict:
    return {
        "prompt": f"question number {i} about topic {i * 7}",
        "completion": f" answer {i} is {i * i}",
    }


@pytest.fixture
def run(tmp_path):
    counter = iter(range(10**6))

    def run(
        content: bytes, filename: str = "data.jsonl", *, limits=ingest.Limits(), **options
    ) -> ingest.Ingested:
        n = next(counter)
        source = tmp_path / f"src{n}" / filename
        source.parent.mkdir()
        source.write_bytes(content)
        work = tmp_path / f"work{n}"
        work.mkdir()
        return ingest.ingest(
            source, ingest.Options(name=options.pop("name", "ds"), **options), work, limits
        )

    return run


@pytest.fixture
def rejected(run):
    def rejected(content: bytes, filename: str = "data.jsonl", **kw) -> core.Rejection:
        with pytest.raises(ingest.Rejected) as e:
            run(content, filename, **kw)
        return e.value.rejection

    return rejected


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# -- normalization and content addressing -------------------------------------------------------


def test_rows_are_canonical_and_sha256_ignores_formatting(run):
    a = run(jsonl(pc(1), pc(2)))
    b = run(
        b'\n{ "completion" : " answer 1 is 1",  "prompt": "question number 1 about topic 7",'
        b' "id": 3}\r\n\n' + json.dumps(pc(2)).encode()
    )
    assert lines(a.rows_path) == [core.canonical(pc(1)), core.canonical(pc(2))]
    assert a.sha256 == b.sha256 == hashlib.sha256(a.rows_path.read_bytes()).hexdigest()
    assert run(jsonl(pc(1), pc(3))).sha256 != a.sha256
    assert (a.format, a.source_schema, a.source_format) == (
        "prompt_completion",
        "prompt_completion",
        "jsonl",
    )


def test_byte_order_mark_and_non_ascii_text(run):
    row = {
        "messages": [
            {"role": "system", "content": "Sei gentile."},
            {"role": "user", "content": "Ciao 你好"},
            {"role": "assistant", "content": "Bene!"},
        ]
    }
    got = run(b"\xef\xbb\xbf" + jsonl(row))
    assert got.format == "messages"
    assert "你好" in got.rows_path.read_text(encoding="utf-8")


# -- errors name the file, line and field -------------------------------------------------------


def test_every_line_is_checked_and_errors_name_line_and_field(rejected):
    r = rejected(
        jsonl(
            pc(1),
            '{"prompt": "x" "completion": "y"}',
            {"prompt": "only"},
            {"prompt": "", "completion": 3},
            pc(5),
            [1, 2],
            {"body": "hello"},
        )
    )
    assert r.errors[0] == "data.jsonl:2: invalid JSON: Expecting ',' delimiter (col 16)"
    assert r.errors[1:4] == [
        "data.jsonl:3: field 'completion': missing",
        "data.jsonl:4: field 'prompt': must not be empty",
        "data.jsonl:4: field 'completion': must be a string, got number",
    ]
    assert r.errors[4] == "data.jsonl:6: expected a JSON object, got array"
    assert r.errors[5].startswith("data.jsonl:7: row matches no known schema")
    assert r.errors[5].endswith("got keys ['body']")
    assert r.invalid_lines == 5 and r.total_errors == 6
    assert r.summary().startswith("5 invalid rows; data.jsonl:2: invalid JSON")


def test_mixed_schemas_name_the_row_that_set_the_schema(rejected):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    r = rejected(jsonl("", pc(1), pc(2), chat), filename="mix.jsonl")
    assert r.errors == [
        "mix.jsonl:4: mixed schemas: a openai_chat row in a file of "
        "prompt_completion rows (set by mix.jsonl:2)"
    ]


def test_wrong_encoding_is_named_with_the_line(rejected):
    r = rejected(jsonl(pc(1)) + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    assert len(r.errors) == 1 and r.errors[0].startswith("data.jsonl:2: not valid UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_empty_file_is_an_error(rejected, content):
    r = rejected(content, filename="empty.jsonl")
    assert r.errors == ["empty.jsonl: empty file: no rows"] and r.invalid_lines == 0


def test_errors_are_capped_with_a_total(rejected):
    r = rejected(jsonl(pc(0), *["{bad"] * 30))
    assert r.invalid_lines == 30 and r.total_errors == 30
    assert len(r.errors) == core.MAX_REPORTED_ERRORS
    assert r.summary().endswith("; and 27 more")


def test_options_are_checked_before_reading(rejected):
    r = rejected(
        jsonl(pc(1)),
        name="../etc",
        validation_fraction=1.0,
        test_fraction=-1,
        file_format="xls",
        column_map={"prompt": "q"},
    )
    fields = [e.split(":")[0] for e in r.errors]
    assert fields == ["name", "validation_fraction", "test_fraction", "file_format", "column_map"]


def test_fractions_must_leave_training_rows(rejected):
    r = rejected(jsonl(pc(1)), validation_fraction=0.5, test_fraction=0.5)
    assert r.errors[0].startswith("validation_fraction + test_fraction: must be < 1")


def test_a_line_over_the_limit_is_an_error_not_a_memory_spike(rejected):
    huge = json.dumps({"prompt": "x" * (3 << 20), "completion": "y"}).encode()
    r = rejected(
        jsonl(pc(1)) + huge + b"\n" + jsonl(pc(2)), limits=ingest.Limits(max_line_bytes=1 << 20)
    )
    assert len(r.errors) == 1 and r.errors[0].startswith("data.jsonl:2: line is ")
    assert "limit" in r.errors[0]


def test_compressed_upload_expanding_past_the_limit_is_refused(rejected):
    bomb = gzip.compress(jsonl(*[pc(i) for i in range(2000)]))
    r = rejected(bomb, filename="data.jsonl.gz", limits=ingest.Limits(max_expanded_bytes=10_000))
    assert len(r.errors) == 1 and "data.jsonl.gz" in r.errors[0] and "10000" in r.errors[0]


def test_compressed_upload_within_the_limit_reads_like_the_plain_file(run):
    plain = run(jsonl(*[pc(i) for i in range(50)]))
    packed = run(gzip.compress(jsonl(*[pc(i) for i in range(50)])), "data.jsonl.gz")
    assert packed.sha256 == plain.sha256 and packed.source_format == "jsonl"


# -- policy ------------------------------------------------------------------------------------


def test_invalid_rows_within_the_policy_are_dropped_with_a_warning(run, rejected):
    content = jsonl(*[pc(i) for i in range(19)], {"prompt": "p"})
    rejected(content, policy=ingest.Policy(max_invalid_fraction=0.04))
    got = run(content, policy=ingest.Policy(max_invalid_fraction=0.05))
    assert got.status == "accepted_with_warnings" and got.num_rows == 19
    assert got.warnings[0].startswith("1 invalid row(s) dropped (5.00% of 20")
    assert got.report["errors"] == ["data.jsonl:20: field 'completion': missing"]
    clean = run(jsonl(*[pc(i) for i in range(19)]))
    assert clean.status == "accepted" and clean.warnings == []


def test_duplicate_and_pii_thresholds_reject(rejected):
    rows = [pc(i) for i in range(8)] + [pc(0), pc(1)]
    r = rejected(jsonl(*rows), policy=ingest.Policy(max_duplicate_fraction=0.1))
    assert r.errors == [
        "data.jsonl: 2 of 10 rows exact duplicate (20.00%) is above the policy's 10.00%"
    ]
    pii = [pc(i) for i in range(9)] + [{"prompt": f"mail {SECRET_EMAIL}", "completion": "ok"}]
    r = rejected(jsonl(*pii), policy=ingest.Policy(max_pii_fraction=0.0))
    assert "1 of 10 rows with PII" in r.errors[0]


# -- quality -----------------------------------------------------------------------------------


def test_duplicates_are_reported_and_removed_on_request(run):
    rows = [pc(i) for i in range(10)] + [
        pc(3),
        {"prompt": "QUESTION number 3  about topic 21", "completion": " answer 3 is 9"},
    ]
    kept = run(jsonl(*rows))
    assert kept.num_rows == 12 and kept.report["exact_duplicates"] == 2
    dups = [f for f in kept.report["findings"] if f["kind"] == "duplicate"]
    assert [(f["row"], f["other_row"]) for f in dups] == [(11, 4), (12, 4)]
    removed = run(jsonl(*rows), quality=ingest.Quality(remove_duplicates=True))
    assert removed.num_rows == 10
    assert lines(removed.rows_path) == [core.canonical(pc(i)) for i in range(10)]
    assert removed.warnings == [] and removed.report["exact_duplicates"] == 0
    assert removed.report["removed"] == {"exact_duplicates": 2, "near_duplicates": 0}
    assert kept.warnings == ["2 exact duplicate row(s)"]


def test_near_duplicates_are_removed_keeping_the_earliest(run):
    base = (
        "The quick brown fox jumps over the lazy dog while the farmer watches from the "
        "porch and the sun sets slowly behind the distant hills of the quiet valley"
    )
    rows = [
        {"text": base},
        {"text": base.replace("quick", "quack")},
        {
            "text": "A completely different sentence about databases, indexes and the cost of "
            "joins in a relational query planner under heavy concurrent load"
        },
    ]
    got = run(jsonl(*rows), quality=ingest.Quality(remove_near_duplicates=True))
    assert got.report["removed"]["near_duplicates"] == 1 and got.report["near_duplicates"] == 0
    assert [json.loads(x)["text"] for x in lines(got.rows_path)] == [base, rows[2]["text"]]


def test_pii_is_counted_with_row_references_and_redacted_into_the_version(run):
    rows = [pc(i) for i in range(5)] + [
        {"prompt": f"Contact {SECRET_EMAIL} or 4111 1111 1111 1111", "completion": "noted"}
    ]
    found = run(jsonl(*rows))
    assert found.report["pii_counts"] == {"credit_card": 1, "email": 1}
    assert found.report["pii_rows"] == 1
    refs = {f["kind"]: f for f in found.report["findings"] if f["kind"].startswith("pii:")}
    assert refs["pii:email"]["row"] == 6 and refs["pii:email"]["detail"].startswith("data.jsonl:6")
    assert SECRET_EMAIL not in json.dumps(found.report)  # the report masks what it found
    assert SECRET_EMAIL in found.rows_path.read_text()
    redacted = run(jsonl(*rows), quality=ingest.Quality(redact_pii=True))
    text = redacted.rows_path.read_text()
    assert SECRET_EMAIL not in text and "4111" not in text
    assert "[EMAIL]" in text and "[CREDIT_CARD]" in text
    assert redacted.report["redacted"] == {"credit_card": 1, "email": 1}
    assert (redacted.report["pii_rows"], redacted.report["pii_counts"]) == (0, {})
    assert redacted.status == "accepted" and found.status == "accepted_with_warnings"
    assert redacted.sha256 != found.sha256


def test_length_outliers_are_reported(run):
    rows = [pc(i) for i in range(30)] + [{"prompt": "q " * 2000, "completion": "a"}]
    got = run(jsonl(*rows))
    assert got.report["length_outliers"] == 1
    assert [f["row"] for f in got.report["findings"] if f["kind"] == "outlier"] == [31]
    assert got.report["chars"]["max"] > 4000 and got.report["chars"]["count"] == 31


def test_token_lengths_and_truncation_with_a_token_counter(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_bytes(jsonl(*[pc(i) for i in range(10)]))
    got = ingest.ingest(
        source,
        ingest.Options(name="ds", max_length=8),
        tmp_path,
        token_counter=lambda row: len((row["prompt"] + row["completion"]).split()),
    )
    lengths = [len((pc(i)["prompt"] + pc(i)["completion"]).split()) for i in range(10)]
    assert got.report["tokens"]["max"] == max(lengths)
    assert got.report["truncated_rows"] == sum(n > 8 for n in lengths) > 0


# -- splits ------------------------------------------------------------------------------------


def test_split_is_deterministic_follows_the_bands_and_files_match_their_sha(run):
    content = jsonl(*[pc(i) for i in range(1000)])
    a = run(content, validation_fraction=0.2, test_fraction=0.1, seed=7)
    b = run(content, validation_fraction=0.2, test_fraction=0.1, seed=7)
    c = run(content, validation_fraction=0.2, test_fraction=0.1, seed=8)
    assert a.split_sha256 == b.split_sha256 != c.split_sha256
    rows = lines(a.rows_path)
    for split, path in a.split_paths.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == a.split_sha256[split]
        for row in lines(path):
            u = ingest.split_unit(7, row)
            assert {"test": u < 0.1, "validation": 0.1 <= u < 0.3, "train": u >= 0.3}[split]
    assert sum(a.counts.values()) == 1000 and sorted(
        sum(map(lines, a.split_paths.values()), [])
    ) == sorted(rows)
    assert 60 < a.counts["test"] < 140 and 150 < a.counts["validation"] < 250


def test_default_split_has_no_test_file(run):
    got = run(jsonl(*[pc(i) for i in range(100)]))
    assert set(got.split_paths) == {"train", "validation"}
    assert got.counts["train"] + got.counts["validation"] == 100


def test_requested_splits_are_never_empty_and_the_moved_row_is_the_nearest():
    units = np.array([0.5, 0.9, 0.35, 0.7])
    sides = ingest.assign_splits(units, {"test": 0.1, "validation": 0.2})
    assert list(sides) == [2, 0, 1, 0]  # validation takes 0.35 (nearest its band), test 0.5
    assert list(ingest.assign_splits(np.array([0.4]), {"test": 0.1, "validation": 0.5})) == [0]
    two = ingest.assign_splits(np.array([0.01, 0.02]), {"test": 0.0, "validation": 0.9})
    assert sorted(two) == [0, 1]


def test_duplicate_rows_land_on_the_same_side(run):
    got = run(jsonl(*[pc(i % 7) for i in range(70)]), validation_fraction=0.3, seed=1)
    for split, path in got.split_paths.items():
        other = set().union(*(lines(p) for s, p in got.split_paths.items() if s != split))
        assert not set(lines(path)) & other


# -- other file formats and archives ------------------------------------------------------------


def test_a_tar_holding_a_datasets_folder_is_read_as_that_folder(tmp_path, run):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf" / "my-data"
    datasets.Dataset.from_list([pc(i) for i in range(6)]).save_to_disk(str(folder))
    archive = tmp_path / "my-data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="my-data")
    got = run(archive.read_bytes(), "my-data.tar")
    assert got.source_format == "hf_disk"
    assert lines(got.rows_path) == [core.canonical(pc(i)) for i in range(6)]


def test_a_tar_escaping_its_folder_is_refused(tmp_path, rejected):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../../outside.txt")
    r = rejected(evil.read_bytes(), "evil.tar")
    assert r.errors[0].startswith("evil.tar: ")
    assert not (tmp_path / "outside.txt").exists()


# -- every fixture through the whole pipeline ---------------------------------------------------

FIXTURES = Path(__file__).parent.parent / "fixtures" / "datasets"
EXPECTED_FORMAT = {"prompt_completion": "prompt_completion", "alpaca": "prompt_completion",
                   "sharegpt": "messages", "openai_chat": "messages", "preference": "preference",
                   "text": "text"}


def _fixture_cases():
    for path in sorted(FIXTURES.iterdir()):
        skipped = ("bad", "expected", "make_fixtures.py", "__pycache__")
        if path.name in skipped or path.suffix == ".zst":
            continue
        schema = next(s for s in sorted(EXPECTED_FORMAT, key=len, reverse=True)
                      if path.name.startswith(s))
        yield pytest.param(path, EXPECTED_FORMAT[schema], id=path.name)


@pytest.mark.parametrize(("path", "fmt"), list(_fixture_cases()))
def test_every_fixture_ingests_to_the_same_normalized_rows(tmp_path, path, fmt):
    expected = (FIXTURES / "expected" / f"{fmt}.jsonl").read_text(encoding="utf-8").splitlines()
    got = ingest.ingest(path, ingest.Options(name="fixture"), tmp_path)
    assert got.format == fmt
    assert [json.loads(x) for x in lines(got.rows_path)] == [json.loads(x) for x in expected]


def test_the_redacted_version_of_the_seeded_pii_fixture_holds_none_of_it(tmp_path):
    seeded = FIXTURES.parent / "pii" / "seeded.jsonl"
    expected = [e for line in lines(seeded) for e in json.loads(line)["expected"]]
    got = ingest.ingest(seeded, ingest.Options(name="pii", schema="text",
                                               quality=ingest.Quality(redact_pii=True)), tmp_path)
    text = got.rows_path.read_text(encoding="utf-8")
    assert {e["type"] for e in expected} == set(PII_TYPES)
    assert [e["value"] for e in expected if e["value"] in text] == []
    assert sum(got.report["redacted"].values()) >= len(expected)


def test_one_split_of_a_datasets_folder_can_be_read_alone(tmp_path, rejected):
    folder = FIXTURES / "prompt_completion_dict_hf"
    expected = lines(FIXTURES / "expected" / "prompt_completion.jsonl")
    everything = ingest.ingest(folder, ingest.Options(name="d"), tmp_path / "a")
    train = ingest.ingest(folder, ingest.Options(name="d", source_split="train"), tmp_path / "b")
    assert len(lines(everything.rows_path)) == len(expected)
    assert 0 < len(lines(train.rows_path)) < len(expected)
    assert json.loads(lines(train.rows_path)[0]) == json.loads(expected[0])
    with pytest.raises(ingest.Rejected) as e:
        ingest.ingest(folder, ingest.Options(name="d", source_split="dev"), tmp_path / "c")
    assert e.value.rejection.errors == [
        "prompt_completion_dict_hf: has no split 'dev'; its splits: train, test"]
    r = rejected(jsonl(pc(1)), source_split="train")
    assert r.errors == ["data.jsonl: source_split applies to datasets folders (hf_disk), not jsonl"]


def test_near_duplicate_removal_also_removes_exact_duplicates_and_the_report_agrees(run):
    rows = [pc(i) for i in range(30)] + [pc(1), pc(2)]
    got = run(jsonl(*rows), quality=ingest.Quality(remove_near_duplicates=True))
    assert got.num_rows == 30
    assert got.report["exact_duplicates"] == 0 and got.report["removed"]["exact_duplicates"] == 2
    assert got.report["chars"]["count"] == 30 and got.warnings == []


def test_stats_and_pii_rows_count_the_rows_kept(run):
    leak = {"prompt": f"mail {SECRET_EMAIL} now please", "completion": " sure thing"}
    rows = [pc(i) for i in range(10)] + [leak, leak, leak]
    got = run(jsonl(*rows), quality=ingest.Quality(remove_duplicates=True))
    assert got.num_rows == 11 and got.report["pii_rows"] == 1
    assert got.report["chars"]["count"] == 11
    assert got.warnings == ["PII in 1 row(s): email 3"]


def test_rows_equal_after_redaction_are_duplicates_of_the_version(run):
    rows = [pc(i) for i in range(5)] + [
        {"prompt": "write to ann@example.com", "completion": "ok"},
        {"prompt": "write to bob@example.org", "completion": "ok"}]
    got = run(jsonl(*rows), quality=ingest.Quality(redact_pii=True, remove_duplicates=True))
    assert got.num_rows == 6 and got.report["removed"]["exact_duplicates"] == 1
    assert got.report["redacted"] == {"email": 2}


def test_pii_is_found_per_field_as_redaction_sees_it(run):
    split_secret = {"prompt": "Xk9mPq2vL7wR4zAb93", "completion": "set api_key ="}
    found = run(jsonl(*[pc(i) for i in range(3)], split_secret))
    redacted = run(jsonl(*[pc(i) for i in range(3)], split_secret),
                   quality=ingest.Quality(redact_pii=True))
    assert found.report["pii_rows"] == 0 and redacted.report["redacted"] == {}
    assert redacted.sha256 == found.sha256


def test_text_moved_across_fields_is_not_a_duplicate(run):
    got = run(jsonl({"prompt": "alpha beta", "completion": "gamma"},
                    {"prompt": "alpha", "completion": "beta gamma"}))
    assert got.report["exact_duplicates"] == 0


def test_the_default_validation_fraction_counts_towards_leaving_training_rows(rejected):
    r = rejected(jsonl(*[pc(i) for i in range(20)]), test_fraction=0.9)
    assert r.errors == ["validation_fraction + test_fraction: must be < 1 (no training rows "
                        "left), got 1"]


def test_a_tar_with_too_many_entries_is_refused(tmp_path, rejected, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_TAR_MEMBERS", 5)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        (folder / f"f{i}").write_text("x")
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="many")
    r = rejected(archive.read_bytes(), "many.tar")
    assert r.errors == ["many.tar: more than 5 entries; a datasets folder has a few files"]


def test_a_parquet_file_decoding_past_the_expansion_limit_is_refused(tmp_path, rejected):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "bomb.parquet"
    table = pa.table({"prompt": ["x" * (1 << 20)] * 8, "completion": ["y"] * 8})
    pq.write_table(table, path, compression="zstd")
    assert path.stat().st_size < 100_000
    r = rejected(path.read_bytes(), "bomb.parquet",
                 limits=ingest.Limits(max_expanded_bytes=4 << 20, max_line_bytes=2 << 20))
    assert len(r.errors) == 1 and r.errors[0].startswith("bomb.parquet: expands to more than")


def test_an_ingest_stops_when_its_caller_goes_away(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_bytes(jsonl(*[pc(i) for i in range(5000)]))
    checks = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) == 2

    with pytest.raises(ingest.Cancelled, match="stopped after 2000 records"):
        ingest.ingest(source, ingest.Options(name="d"), tmp_path / "w", should_stop=should_stop)
    assert len(checks) == 2

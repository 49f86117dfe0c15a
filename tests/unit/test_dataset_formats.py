"""Dataset upload files: format detection, decompression, record-by-record reading.

The fixtures in tests/fixtures/datasets hold the same rows as every input schema in every file
format (make_fixtures.py writes them); each must read back to the same normalized rows.
"""

from __future__ import annotations

import bz2
import gzip
import json
import shutil
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.dataset import formats, schemas
from services.dataset.formats import RecordError, SourceError, limits

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"
BAD = FIXTURES / "bad"
LIMIT = 1 << 20
INPUT_SCHEMAS = ("prompt_completion", "alpaca", "openai_chat", "sharegpt", "preference", "text")
FILES = {  # file format -> fixture name for a schema
    "jsonl": "{}.jsonl",
    "json": "{}.json",
    "csv": "{}.csv",
    "parquet": "{}.parquet",
    "hf_disk": "{}_hf",
}
VARIANTS = [  # (fixture, file format, schema): the same rows in other shapes
    ("prompt_completion_wrapped.json", "json", "prompt_completion"),
    ("prompt_completion_bom_crlf.jsonl", "jsonl", "prompt_completion"),
    ("prompt_completion_dict_hf", "hf_disk", "prompt_completion"),
    ("preference_conversational.jsonl", "jsonl", "preference"),
]


def expected_rows(schema: str) -> list[dict]:
    path = FIXTURES / "expected" / f"{schemas.NORMALIZED_FORMAT[schema]}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def read(path: Path, file_format: str | None = None, **kw) -> list[tuple[str, object]]:
    file_format = file_format or formats.detect_file_format(path, path.name)
    kw.setdefault("max_line_bytes", LIMIT)
    return list(formats.read_records(path, path.name, file_format, **kw))


def normalized(records: list[tuple[str, object]], schema: str | None = None) -> list[dict]:
    rows = []
    for location, record in records:
        assert not isinstance(record, RecordError), f"{location}: {record.reason}"
        row, errors = schemas.normalize(record, schema)
        assert not errors, f"{location}: {errors}"
        rows.append(row)
    return rows


# -- every fixture gives the same normalized rows -----------------------------------------------

FIXTURE_CASES = [
    (FILES[fmt].format(schema), fmt, schema) for schema in INPUT_SCHEMAS for fmt in FILES
] + VARIANTS


@pytest.mark.parametrize(("fixture", "file_format", "schema"), FIXTURE_CASES)
def test_every_fixture_normalizes_to_the_same_rows(fixture, file_format, schema):
    path = FIXTURES / fixture
    assert formats.detect_file_format(path, fixture) == file_format
    records = read(path, file_format)
    assert [schemas.detect_schema(r) for _, r in records] == [schema] * len(records)
    assert normalized(records) == expected_rows(schema)  # schema detected per record
    assert normalized(records, schema) == expected_rows(schema)  # schema named


def test_alpaca_and_prompt_completion_give_the_same_rows_and_so_do_the_chat_schemas():
    assert expected_rows("alpaca") == expected_rows("prompt_completion")
    assert expected_rows("sharegpt") == expected_rows("openai_chat")
    messages = [r["messages"] for r in expected_rows("openai_chat")]
    assert messages[0][0] == {"role": "system", "content": "You reverse words."}
    assert [m["role"] for m in messages[1]] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("fixture", "locations"),
    [
        ("prompt_completion.jsonl", [f"prompt_completion.jsonl:{n}" for n in (1, 2, 3, 4)]),
        # BOM + CRLF + blank lines: the line numbers are the file's
        (
            "prompt_completion_bom_crlf.jsonl",
            [f"prompt_completion_bom_crlf.jsonl:{n}" for n in (2, 4, 6, 8)],
        ),
        # a record's line is where it starts; rows 2 and 4 hold quoted newlines
        ("prompt_completion.csv", [f"prompt_completion.csv:{n}" for n in (2, 3, 6, 7)]),
        (
            "prompt_completion.json",
            [f"prompt_completion.json:item {i} (line {n})" for i, n in enumerate((2, 6, 10, 14))],
        ),
        (
            "prompt_completion_wrapped.json",
            [f"prompt_completion_wrapped.json:item {i} (line 1)" for i in range(4)],
        ),
        ("prompt_completion.parquet", [f"prompt_completion.parquet:row {i}" for i in range(4)]),
        ("prompt_completion_hf", [f"prompt_completion_hf:row {i}" for i in range(4)]),
        (
            "prompt_completion_dict_hf",
            [f"prompt_completion_dict_hf:train:row {i}" for i in range(3)]
            + ["prompt_completion_dict_hf:test:row 0"],
        ),
    ],
)
def test_locations_name_the_file_and_where_the_record_starts(fixture, locations):
    assert [location for location, _ in read(FIXTURES / fixture)] == locations


@pytest.mark.parametrize("chunk_bytes", [1, 2, 7, 64])
@pytest.mark.parametrize(
    "fixture",
    [
        "openai_chat.jsonl",
        "openai_chat.json",
        "openai_chat.csv",
        "prompt_completion_wrapped.json",
        "prompt_completion_bom_crlf.jsonl",
    ],
)
def test_records_split_across_read_chunks_read_the_same(monkeypatch, fixture, chunk_bytes):
    whole = read(FIXTURES / fixture)
    monkeypatch.setattr(limits, "CHUNK_BYTES", chunk_bytes)
    assert read(FIXTURES / fixture) == whole


def test_a_dataset_dict_reads_one_split_when_asked():
    path = FIXTURES / "prompt_completion_dict_hf"
    records = read(path, "hf_disk", split="test")
    assert records == [
        ("prompt_completion_dict_hf:test:row 0", expected_rows("prompt_completion")[3])
    ]
    with pytest.raises(
        SourceError,
        match=r"^prompt_completion_dict_hf: has no split 'dev'; its splits: train, test$",
    ):
        read(path, "hf_disk", split="dev")
    with pytest.raises(SourceError, match="holds one dataset, no splits"):
        read(FIXTURES / "text_hf", "hf_disk", split="train")
    with pytest.raises(ValueError, match="split applies to hf_disk only"):
        read(FIXTURES / "text.jsonl", "jsonl", split="train")


# -- bad input: each with its own error ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "location", "reason"),
    [
        ("invalid_json.jsonl", "invalid_json.jsonl:3", "invalid JSON: Expecting value (col 37)"),
        (
            "latin1.jsonl",
            "latin1.jsonl:2",
            "not valid UTF-8 (byte 16): the text looks Latin-1/Windows-1252 encoded "
            "(byte 0xE9 is 'é' there); re-encode the file as UTF-8",
        ),
        (
            "utf16_line.jsonl",
            "utf16_line.jsonl:4",
            "not valid UTF-8 (NUL at byte 2): the text looks UTF-16 encoded; "
            "re-encode the file as UTF-8",
        ),
        ("ragged.csv", "ragged.csv:3", "has 3 cells, the header has 2"),
        (
            "index_column.csv",
            "index_column.csv:2",
            "cell 1 holds a value, but its column has no name in the header (an index column? "
            "export without it, as pandas' to_csv(index=False) does)",
        ),
        (
            "invalid_item.json",
            "invalid_item.json:item 1 (line 3)",
            "invalid JSON: Expecting value (line 4, col 18)",
        ),
    ],
)
def test_a_bad_record_is_reported_with_location_and_reason_and_the_others_read(
    fixture, location, reason
):
    records = read(BAD / fixture)
    errors = [(loc, r.reason) for loc, r in records if isinstance(r, RecordError)]
    assert errors == [(location, reason)]
    assert all(isinstance(r, dict) for loc, r in records if loc != location)
    assert len(records) > 1


def test_the_rows_around_a_ragged_csv_row_are_read():
    records = dict(read(BAD / "ragged.csv"))
    assert records["ragged.csv:2"] == {"prompt": "a", "completion": "b"}
    assert records["ragged.csv:4"] == {"prompt": "f\ng", "completion": "h"}


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        (
            "utf16.jsonl",
            "utf16.jsonl: starts with a UTF-16 byte-order mark; re-encode the file as UTF-8",
        ),
        ("empty.jsonl", "empty.jsonl: empty file: no rows"),
        ("not_a_dataset", "not_a_dataset: a folder that is not a saved Hugging Face dataset"),
    ],
)
def test_an_unreadable_upload_is_refused_by_detection_and_by_the_reader(fixture, message):
    path = BAD / fixture
    with pytest.raises(SourceError) as detected:
        formats.detect_file_format(path, fixture)
    assert str(detected.value).startswith(message)
    file_format = "hf_disk" if path.is_dir() else "jsonl"
    with pytest.raises(SourceError) as read_error:
        read(path, file_format)
    assert str(read_error.value).startswith(message)


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    path = _write(tmp_path, "x.jsonl", (BAD / "utf16.jsonl").read_bytes()[2:])
    with pytest.raises(SourceError, match=r"^x\.jsonl: looks UTF-16 encoded \(NUL bytes"):
        formats.detect_file_format(path, "x.jsonl")
    with pytest.raises(SourceError, match=r"^x\.jsonl: looks UTF-16 encoded \(NUL bytes"):
        read(path, "jsonl")


def test_a_csv_without_a_header_row_is_refused():
    with pytest.raises(SourceError, match=r"^blank\.csv: no header row"):
        read(BAD / "blank.csv", "csv")


def test_csv_headers_that_name_a_column_twice_are_refused(tmp_path):
    path = _write(tmp_path, "dup.csv", b"prompt,completion,prompt\na,b,c\n")
    with pytest.raises(SourceError, match=r"^dup\.csv:1: the header names column 'prompt' twice$"):
        read(path)


def test_invalid_utf8_in_a_csv_cell_names_the_column(tmp_path):
    path = _write(tmp_path, "l1.csv", b"prompt,completion\nok,caf\xe9\n")
    [(location, error)] = read(path)
    assert location == "l1.csv:2"
    assert error.reason.startswith(
        "not valid UTF-8 (byte 4 of column 'completion'): the text looks Latin-1"
    )


def test_a_truncated_json_file_reads_its_complete_items_then_fails():
    records = formats.read_records(
        BAD / "truncated.json", "truncated.json", "json", max_line_bytes=LIMIT
    )
    assert next(records) == ("truncated.json:item 0 (line 2)", {"prompt": "a", "completion": "b"})
    with pytest.raises(
        SourceError, match=r"^truncated\.json:3: the file ends inside the JSON value"
    ):
        next(records)


@pytest.mark.parametrize(
    ("content", "records", "error"),
    [
        (b"[]", [], None),
        (b' [ {"a": "],\\"}{"} , {"b": "\\\\"} ] ', [{"a": '],"}{'}, {"b": "\\"}], None),
        (b'[{"a": 1}, 7]', [{"a": 1}, RecordError("expected a JSON object, got number")], None),
        (
            b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]",
            [RecordError("invalid JSON: nested too deeply")],
            None,
        ),
        (b'[{"a": 1}] {"b": 2}', [{"a": 1}], "x.json:1: unexpected data after the records"),
        (b'{"data": [{"a": 1}], "more": 2}', [{"a": 1}], "the object has more fields than 'data'"),
        (b'{"prompt": "a", "completion": "b"}', [], "field 'prompt' is no array"),
        (b"  \n ", [], "x.json: holds no JSON, only whitespace"),
    ],
)
def test_json_streaming_edge_cases(tmp_path, content, records, error):
    path = _write(tmp_path, "x.json", content)
    stream = formats.read_records(path, "x.json", "json", max_line_bytes=LIMIT)
    got = []
    if error:
        with pytest.raises(SourceError, match=error.replace("(", r"\(")):
            got.extend(value for _, value in stream)
    else:
        got.extend(value for _, value in stream)
    assert got == records


def test_a_jsonl_line_that_is_not_an_object_is_a_record_error(tmp_path):
    path = _write(tmp_path, "x.jsonl", b'[1, 2]\n"text"\n{"a": 1}')
    assert read(path) == [
        ("x.jsonl:1", RecordError("expected a JSON object, got array")),
        ("x.jsonl:2", RecordError("expected a JSON object, got string")),
        ("x.jsonl:3", {"a": 1}),
    ]


def test_a_corrupt_parquet_file_is_refused(tmp_path):
    path = _write(tmp_path, "x.parquet", b"PAR1 this is no parquet PAR1")
    with pytest.raises(SourceError, match=r"^x\.parquet: not a readable Parquet file"):
        read(path, "parquet")


def test_a_saved_dataset_cannot_point_outside_its_folder(tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(FIXTURES / "text_hf", folder)
    shutil.copy(folder / "data-00000-of-00001.arrow", tmp_path / "secret.arrow")
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "../secret.arrow"}]})
    )
    with pytest.raises(
        SourceError, match=r"^ds: refers to '\.\./secret\.arrow', outside the dataset folder"
    ):
        read(folder, "hf_disk")


def test_read_records_refuses_an_unknown_format_and_a_folder_for_a_file():
    with pytest.raises(
        SourceError, match=r"^text\.jsonl: unknown file format 'xlsx'; known: jsonl, json"
    ):
        read(FIXTURES / "text.jsonl", "xlsx")
    with pytest.raises(SourceError, match=r"^text_hf: is a folder, not a jsonl file"):
        read(FIXTURES / "text_hf", "jsonl")


# -- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content", "file_format"),
    [
        ("x.json", b'[{"a": 1}]', "json"),
        ("x.json", b'\xef\xbb\xbf\n  [\n{"a": 1}]', "json"),
        ("x.json", b'{"a": 1}\n{"a": 2}\n', "jsonl"),  # JSON Lines named .json
        ("x.json", b'{"data": [{"a": 1}]}', "json"),
        ("x.json", b'{"messages": [{"role": "user"}], "id": 1}', "jsonl"),  # one record
        ("upload", b'{\n  "data": [\n', "json"),  # an indented document
        ("upload", b'{"a": 1}', "jsonl"),
        ("upload", b"[1]", "json"),
        ("x.jsonl", b"[1]\n[2]\n", "jsonl"),  # the extension decides: each line is checked
        ("x.jsonl.gz", b'{"a": 1}\n', "jsonl"),  # already decompressed; named as uploaded
        ("x.CSV", b"a,b\n1,2\n", "csv"),
        ("x.jsonl", b"PAR1\x00\x00", "parquet"),  # the magic wins over the name
    ],
)
def test_detect_file_format(tmp_path, filename, content, file_format):
    assert formats.detect_file_format(_write(tmp_path, filename, content), filename) == file_format


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("x.txt", b"hello", "x.txt: unknown file format: expected JSON Lines (.jsonl)"),
        (
            "x.jsonl",
            gzip.compress(b"{}", mtime=0),
            "x.jsonl: is gzip-compressed; decompress it first",
        ),
        ("x.zip", b"PK\x03\x04rest", "x.zip: is a zip archive, which is not supported"),
        ("x.parquet", b"a,b\n", "x.parquet: not a Parquet file (it does not start with PAR1)"),
    ],
)
def test_detect_file_format_refuses(tmp_path, filename, content, message):
    with pytest.raises(SourceError) as e:
        formats.detect_file_format(_write(tmp_path, filename, content), filename)
    assert str(e.value).startswith(message)


# -- bounded memory -----------------------------------------------------------------------------

LONG = 20 << 20  # bytes in the over-long record


@pytest.mark.parametrize(
    ("filename", "head", "long_record", "tail", "location", "what"),
    [
        (
            "long.jsonl",
            b'{"text": "a"}\n',
            b'{"text": "' + b"x" * LONG + b'"}\n',
            b'{"text": "b"}\n',
            "long.jsonl:2",
            "line",
        ),
        ("long.csv", b"text\na\n", b"x" * LONG + b"\n", b"b\n", "long.csv:3", "line"),
        (
            "long.json",
            b'[{"text": "a"},\n',
            b'{"text": "' + b'x\\"' * (LONG // 3) + b'"},\n',
            b'{"text": "b"}]',
            "long.json:item 1 (line 2)",
            "item",
        ),
    ],
)
def test_a_long_record_is_skipped_in_bounded_memory(
    tmp_path, filename, head, long_record, tail, location, what
):
    path = _write(tmp_path, filename, head + long_record + tail)
    tracemalloc.start()
    try:
        records = list(
            formats.read_records(path, filename, filename.split(".")[1], max_line_bytes=LIMIT)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * LIMIT, f"peak {peak} bytes for a {len(long_record)}-byte record"
    length = len(long_record.rstrip(b",\n"))
    assert records[1] == (
        location,
        RecordError(f"{what} is {length} bytes, longer than the limit of {LIMIT} bytes"),
    )
    assert [r for _, r in records[::2]] == [{"text": "a"}, {"text": "b"}]


# -- size limits of Parquet, saved datasets and CSV records -------------------------------------

BIG = 3 << 20  # bytes in an oversized value: 3 times LIMIT


def _chat(i: int, question: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    }


def _save(folder: Path, file_format: str, rows: list[dict] | dict[str, list[dict]]) -> Path:
    """rows as a zstd-compressed Parquet file, or a folder of datasets' save_to_disk (a
    DatasetDict for a dict of splits)."""
    if file_format == "parquet":
        path = folder / "x.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")
        return path
    datasets = pytest.importorskip("datasets")
    path = folder / "x"
    if isinstance(rows, dict):
        splits = {name: datasets.Dataset.from_list(split) for name, split in rows.items()}
        datasets.DatasetDict(splits).save_to_disk(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("file_format", ["parquet", "hf_disk"])
def test_a_row_over_the_limit_is_a_record_error_and_never_a_python_object(tmp_path, file_format):
    rows = [_chat(i, f"question {i}") for i in range(150)]  # batches of 64 rows, and more
    rows[70] = _chat(70, "x" * BIG)
    path = _save(tmp_path, file_format, rows)
    tracemalloc.start()
    try:
        records = read(path, file_format)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BIG // 2, f"peak {peak} bytes: the {BIG}-byte text became a str"
    assert [location for location, _ in records] == [f"{path.name}:row {i}" for i in range(150)]
    size = BIG + len("user") + len("assistant") + len("answer 70")  # its values' bytes
    assert records[70][1] == RecordError(
        f"record is {size} bytes, longer than the limit of {LIMIT} bytes"
    )
    assert [r for _, r in records[:70] + records[71:]] == rows[:70] + rows[71:]


@pytest.mark.parametrize("file_format", ["parquet", "hf_disk"])
def test_rows_that_expand_past_max_total_bytes_stop_the_upload(tmp_path, file_format):
    half = LIMIT // 2
    path = _save(tmp_path, file_format, [{"text": "x" * half}] * 4)
    if file_format == "parquet":
        assert path.stat().st_size < 64 << 10  # compressed inside: the upload limit sees this
    name, limit = path.name, 3 * half - 1  # row 2 passes it
    records = formats.read_records(
        path, name, file_format, max_line_bytes=LIMIT, max_total_bytes=limit
    )
    read_before = []
    with pytest.raises(SourceError) as e:
        read_before.extend(location for location, _ in records)
    assert str(e.value) == (
        f"{name}: expands to more than {limit} bytes of values, the limit for an upload "
        f"(passed at {name}:row 2)"
    )
    assert read_before == [f"{name}:row 0", f"{name}:row 1"]
    assert len(read(path, file_format, max_total_bytes=4 * half)) == 4  # the limit is inclusive


def test_max_total_bytes_counts_every_split_of_a_saved_dataset_dict(tmp_path):
    half = LIMIT // 2
    row = {"text": "x" * half}
    path = _save(tmp_path, "hf_disk", {"train": [row, row], "test": [row, row]})
    with pytest.raises(SourceError, match=r"\(passed at x:test:row 1\)$"):
        read(path, "hf_disk", max_total_bytes=3 * half)
    assert len(read(path, "hf_disk", split="test", max_total_bytes=3 * half)) == 2


def test_a_csv_record_over_the_limit_across_lines_and_cells_is_skipped_in_bounded_memory(
    tmp_path,
):
    cell = b'"' + (b"x" * (64 << 10) + b"\n") * 40 + b'"'  # 2.5 MiB in lines of 64 KiB
    record = b",".join([cell] * 3)
    path = _write(tmp_path, "x.csv", b"a,b,c\n1,2,3\n" + record + b"\n4,5,6\n")
    tracemalloc.start()
    try:
        records = read(path, "csv")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    end = 3 + record.count(b"\n")
    assert records == [
        ("x.csv:2", {"a": "1", "b": "2", "c": "3"}),
        (
            "x.csv:3",
            RecordError(
                f"record is {len(record)} bytes, longer than the limit of {LIMIT} bytes "
                f"(lines 3 to {end})"
            ),
        ),
        (f"x.csv:{end + 1}", {"a": "4", "b": "5", "c": "6"}),
    ]
    # csv holds up to LIMIT characters of the record, 4 bytes each; all of it would be 30 MiB
    assert peak < 8 * LIMIT, f"peak {peak} bytes for a {len(record)}-byte record"


def _record_too_long(size: int, start: int, end: int) -> RecordError:
    return RecordError(
        f"record is {size} bytes, longer than the limit of 64 bytes (lines {start} to {end})"
    )


@pytest.mark.parametrize(
    ("content", "records"),
    [
        (  # an over-long line opens a quoted cell that goes on; its "" split across reads
            b'a,b\n"' + b'x""' * 40 + b'\nmore",b\nnext,row\n',
            [("x.csv:2", _record_too_long(129, 2, 3)), ("x.csv:4", {"a": "next", "b": "row"})],
        ),
        (  # the file ends inside the quoted cell
            b'a,b\n1,2\n"' + b"y\n" * 40,
            [("x.csv:2", {"a": "1", "b": "2"}), ("x.csv:3", _record_too_long(80, 3, 42))],
        ),
        (  # a quote then text: csv (strict) ends the record at that line
            b'a,b\n"' + b"z\n" * 40 + b'"junk,b\nnext,row\n',
            [("x.csv:2", _record_too_long(88, 2, 42)), ("x.csv:43", {"a": "next", "b": "row"})],
        ),
    ],
    ids=["quote-opened-on-a-long-line", "file-ends-in-the-quote", "quote-then-text"],
)
def test_csv_records_over_the_limit_end_where_csv_ends_them(
    tmp_path, monkeypatch, content, records
):
    monkeypatch.setattr(limits, "CHUNK_BYTES", 7)
    path = _write(tmp_path, "x.csv", content)
    assert read(path, "csv", max_line_bytes=64) == records


def test_a_csv_header_over_the_limit_is_refused(tmp_path):
    path = _write(tmp_path, "x.csv", b'"' + b"h\n" * 40 + b'",b\n1,2\n')
    with pytest.raises(SourceError) as e:
        read(path, "csv", max_line_bytes=64)
    assert str(e.value) == "x.csv:1: the header row is 84 bytes, longer than the limit of 64 bytes"


# -- decompression ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_decompress_gives_the_file_back(tmp_path, compression):
    src = FIXTURES / f"prompt_completion.jsonl.{compression}"
    assert formats.compression_of(src) == compression
    size = formats.decompress(src, tmp_path / "out", max_bytes=LIMIT)
    raw = (FIXTURES / "prompt_completion.jsonl").read_bytes()
    assert (tmp_path / "out").read_bytes() == raw and size == len(raw)
    # the uploaded name still tells the format, and locations name the upload
    assert formats.detect_file_format(tmp_path / "out", src.name) == "jsonl"
    records = formats.read_records(tmp_path / "out", src.name, "jsonl", max_line_bytes=LIMIT)
    assert normalized(list(records)) == expected_rows("prompt_completion")


def test_zstd_multi_frame_files_decompress_whole_when_zstandard_is_installed(tmp_path):
    pytest.importorskip("zstandard")
    src = FIXTURES / "prompt_completion.jsonl.zst"
    formats.decompress(src, tmp_path / "out", max_bytes=LIMIT)
    assert (tmp_path / "out").read_bytes() == (FIXTURES / "prompt_completion.jsonl").read_bytes()


def test_zstd_without_zstandard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    src = FIXTURES / "prompt_completion.jsonl.zst"
    assert formats.compression_of(src) == "zst"
    with pytest.raises(
        SourceError,
        match=r"^prompt_completion\.jsonl\.zst: is zstd-compressed, "
        r"but this server cannot read zstd \(the zstandard package",
    ):
        formats.decompress(src, tmp_path / "out", max_bytes=LIMIT)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress])
def test_a_decompression_bomb_stops_at_the_limit_and_leaves_nothing(tmp_path, compress):
    bomb = _write(tmp_path, "bomb.jsonl.gz", compress(b"\n" * (50 << 20)))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(SourceError) as e:
            formats.decompress(bomb, tmp_path / "out", max_bytes=10 << 20, filename="upload.gz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (
        str(e.value)
        == f"upload.gz: decompresses to more than {10 << 20} bytes, the limit for an upload"
    )
    assert not (tmp_path / "out").exists()
    assert peak < 2 << 20  # a fraction of the 10 MB it stops at


def test_the_limit_is_inclusive(tmp_path):
    raw = (FIXTURES / "prompt_completion.jsonl").read_bytes()
    src = FIXTURES / "prompt_completion.jsonl.gz"
    assert formats.decompress(src, tmp_path / "out", max_bytes=len(raw)) == len(raw)
    with pytest.raises(SourceError, match=f"more than {len(raw) - 1} bytes"):
        formats.decompress(src, tmp_path / "out", max_bytes=len(raw) - 1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            gzip.compress(b'{"a": 1}\n' * 1000, mtime=0)[:-40],
            "x.gz: not a valid gzip file: Compressed file ended",
        ),
        (b"BZh9" + b"garbage" * 10, "x.gz: not a valid bzip2 file: Invalid data stream"),
        (b'{"a": 1}\n', "x.gz: not compressed with gz, bz2, xz, zst"),
    ],
)
def test_corrupt_or_uncompressed_input_is_refused_and_leaves_nothing(tmp_path, content, message):
    src = _write(tmp_path, "x.gz", content)
    with pytest.raises(SourceError) as e:
        formats.decompress(src, tmp_path / "out", max_bytes=LIMIT)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "out").exists()


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path

"""The file formats by name, each with its reader, and `read_records`, which picks one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .csv_format import read_csv
from .errors import SourceError
from .json_formats import read_json, read_jsonl
from .limits import Expansion, ReadRequest
from .parquet import read_parquet
from .saved_dataset import read_saved_dataset


@dataclass(frozen=True)
class Reader:
    """How one file format is read: `read(path, request)` yields (location, record or
    RecordError) for each record, in order."""

    read: Callable[[Path, ReadRequest], Iterator[tuple[str, Any]]]
    extensions: tuple[str, ...] = ()  # names that tell the format where the content does not
    folder: bool = False  # reads a folder, whose splits a request may pick; else one file


READERS: dict[str, Reader] = {
    "jsonl": Reader(read_jsonl, (".jsonl", ".ndjson", ".jsonlines")),
    "json": Reader(read_json, (".json",)),
    "csv": Reader(read_csv, (".csv",)),
    "parquet": Reader(read_parquet, (".parquet", ".pq")),
    "hf_disk": Reader(read_saved_dataset, folder=True),
}
FILE_FORMATS = tuple(READERS)


def read_records(
    path: Path,
    filename: str,
    file_format: str,
    *,
    max_line_bytes: int,
    max_total_bytes: int | None = None,
    split: str | None = None,
) -> Iterator[tuple[str, Any]]:
    """(location, record dict or RecordError) for each record of the file, in order.

    max_line_bytes bounds a JSONL line, a CSV record, a JSON item, and the decoded values of a
    Parquet or Arrow row. max_total_bytes bounds the decoded values of all the rows of a Parquet
    file or saved dataset, whose compression is inside the file (None: no bound); the text
    formats are bounded by their file size. split picks one split of a saved DatasetDict
    (hf_disk only); None reads them all."""
    reader = READERS.get(file_format)
    if reader is None:
        raise SourceError(
            f"{filename}: unknown file format {file_format!r}; known: {', '.join(FILE_FORMATS)}"
        )
    if split is not None and not reader.folder:
        folders = ", ".join(name for name, r in READERS.items() if r.folder)
        raise ValueError(f"split applies to {folders} only, not {file_format}")
    if not reader.folder:
        if path.is_dir():
            raise SourceError(f"{filename}: is a folder, not a {file_format} file")
        if path.stat().st_size == 0:
            raise SourceError(f"{filename}: empty file: no rows")
    request = ReadRequest(filename, max_line_bytes, Expansion(filename, max_total_bytes), split)
    return reader.read(path, request)

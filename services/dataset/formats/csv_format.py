"""CSV files: a header row, then one record per row (a quoted cell may span lines). Cells stay
text: schemas decodes the conversation fields that CSV can only hold as JSON text. A record is
bounded across all the lines it spans; csv holds the record it parses as 4-byte characters: up
to 4 * max_line_bytes."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import text
from .errors import RecordError, SourceError
from .limits import ReadRequest, too_long


class _CsvSkip:
    """Follows csv's reader (the default dialect, strict) over the bytes of a record that is
    too long to parse, fed piece by piece, to find the line where the record ends. Quotes and
    commas are ASCII, which UTF-8 never uses inside a multi-byte character."""

    FIELD, UNQUOTED, QUOTED, QUOTE, BROKEN = range(5)  # BROKEN: csv drops the line's rest

    def __init__(self) -> None:
        self.state = self.FIELD

    def feed(self, data: bytes | bytearray) -> None:
        at, state = 0, self.state
        while at < len(data) and state != self.BROKEN:
            if state == self.FIELD:
                quoted = data[at] == ord('"')
                state = self.QUOTED if quoted else self.UNQUOTED
                at += quoted
            elif state == self.UNQUOTED:  # a quote inside an unquoted field is a character
                comma = data.find(b",", at)
                state, at = (self.UNQUOTED, len(data)) if comma == -1 else (self.FIELD, comma + 1)
            elif state == self.QUOTED:
                quote = data.find(b'"', at)
                state, at = (self.QUOTED, len(data)) if quote == -1 else (self.QUOTE, quote + 1)
            else:  # just past a quote in a quoted field: '""' is a quote, '",' ends the field
                char = data[at]
                state = {ord('"'): self.QUOTED, ord(","): self.FIELD}.get(char, self.BROKEN)
                at += 1
        self.state = state

    def line_ends_record(self) -> bool:
        """At a newline; False inside a quoted field, which the newline belongs to."""
        if self.state == self.QUOTED:
            return False
        self.state = self.FIELD
        return True


@dataclass
class _CsvRecord:
    """The physical lines csv.reader read for the record it is reading."""

    start: int = 0  # its first line
    end: int = 0  # its last line so far
    size: int = 0  # bytes from its start, newlines inside it included
    too_long: bool = False  # skipped unparsed: csv was handed a stand-in

    def add(self, lineno: int, length: int) -> None:
        self.size += length + (self.start > 0)
        self.start = self.start or lineno
        self.end = lineno


def read_csv(path: Path, request: ReadRequest) -> Iterator[tuple[str, Any]]:
    filename, max_line_bytes = request.filename, request.max_line_bytes
    # csv's only cell limit is process-wide; a cell may be as long as a record (never lowered,
    # so other readers in the process keep theirs)
    if csv.field_size_limit() < max_line_bytes:
        csv.field_size_limit(max_line_bytes)
    record = _CsvRecord()
    skip = _CsvSkip()

    with text.open_text(path, filename) as stream:
        # text.lines hands over the pieces of a line too long to hold, for skip to follow
        lines = text.lines(stream, max_line_bytes, skip.feed)

        def text_lines() -> Iterator[str]:
            """The lines for csv: one at a time, as it asks. A record that gets longer than
            max_line_bytes is read on to its end unparsed, and csv handed a line that ends it
            (csv asks for a line past the record's first only inside a quoted cell)."""
            while True:
                skip.state = _CsvSkip.QUOTED if record.start else _CsvSkip.FIELD
                if (item := next(lines, None)) is None:
                    return
                lineno, line, length = item
                record.add(lineno, length)
                if line is not None and record.size <= max_line_bytes:
                    # invalid bytes survive as surrogates, reported per cell below
                    yield line.decode("utf-8", "surrogateescape") + "\n"
                    continue
                stand_in = "\n" if record.start == lineno else '"\n'
                if line is not None:
                    skip.feed(line)
                while not skip.line_ends_record() and (item := next(lines, None)):
                    lineno, line, length = item
                    record.add(lineno, length)
                    if line is not None:
                        skip.feed(line)
                record.too_long = True
                yield stand_in

        rows = csv.reader(text_lines(), strict=True)
        header: list[str] | None = None
        while True:
            record = _CsvRecord()  # text_lines sees this one: a closure reads it when it runs
            try:
                row: list[str] | csv.Error = next(rows)
            except StopIteration:
                break
            except csv.Error as e:
                row = e
            start = record.start
            if record.too_long:
                if header is None:
                    raise SourceError(
                        f"{filename}:{start}: the header row is {record.size} bytes, longer "
                        f"than the limit of {max_line_bytes} bytes"
                    )
                yield f"{filename}:{start}", _csvtoo_long(record, max_line_bytes)
            elif isinstance(row, csv.Error):
                if header is None:
                    raise SourceError(f"{filename}:{start}: unreadable CSV header: {row}")
                yield f"{filename}:{start}", RecordError(f"malformed CSV: {row}")
            elif len(row) <= 1 and not "".join(row).strip():
                continue  # a blank line
            elif header is None:
                header = _csv_header(row, filename, start)
            else:
                yield f"{filename}:{start}", _csv_record(row, header)
    if header is None:
        raise SourceError(f"{filename}: no header row: the file holds no CSV rows")


def _csvtoo_long(record: _CsvRecord, limit: int) -> RecordError:
    if record.end == record.start:
        return too_long("line", record.size, limit)
    reason = too_long("record", record.size, limit).reason
    return RecordError(f"{reason} (lines {record.start} to {record.end})")


def _csv_header(row: list[str], filename: str, line: int) -> list[str]:
    names = [cell.strip() for cell in row]
    for name in names:
        if err := _cell_encoding_error(name, "the header"):
            raise SourceError(f"{filename}:{line}: {err.reason}")
    seen = set()
    for name in filter(None, names):
        if name in seen:
            raise SourceError(f"{filename}:{line}: the header names column '{name}' twice")
        seen.add(name)
    if not seen:
        raise SourceError(f"{filename}:{line}: the header row names no columns")
    return names


def _cell_encoding_error(cell: str, where: str) -> RecordError | None:
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that were not UTF-8, kept as surrogate escapes
        raw = cell.encode("utf-8", "surrogateescape")
        return text.not_utf8(raw, len(cell[: e.start].encode("utf-8", "surrogateescape")), where)
    return None


def _csv_record(row: list[str], header: list[str]) -> dict | RecordError:
    if len(row) != len(header):
        return RecordError(f"has {len(row)} cells, the header has {len(header)}")
    record = {}
    for i, (name, cell) in enumerate(zip(header, row, strict=True)):
        if err := _cell_encoding_error(cell, f" of column '{name or i + 1}'"):
            return err
        if name:
            record[name] = cell
        elif cell.strip():
            return RecordError(
                f"cell {i + 1} holds a value, but its column has no name in the header (an "
                "index column? export without it, as pandas' to_csv(index=False) does)"
            )
    return record

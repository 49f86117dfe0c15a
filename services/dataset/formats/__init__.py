"""Upload files read record by record in bounded memory; pure (no I/O beyond the given paths).

    upload --decompress (gz, bz2, xz, zst)--> file --detect_file_format--> read_records
        -> (location, dict | RecordError), one per record, in file order

File formats:

    jsonl    one JSON object per line; blank lines skipped
    json     a top-level array of objects, or an object whose only field is that array
             ({"data": [...]}); streamed item by item, never loaded whole
    csv      a header row, then one record per row (a quoted cell may span lines); cells stay
             text: schemas decodes the conversation fields that CSV can only hold as JSON text
    parquet  read by record batch, a few rows at a time
    hf_disk  a folder written by `datasets`' save_to_disk: a Dataset, or a DatasetDict whose
             splits are read one after another in its dataset_dict.json order (or one of them:
             read_records' `split`)

Text formats must be UTF-8; a UTF-8 byte-order mark at the start is ignored. A JSONL line, a CSV
record (all the lines it spans: a quoted cell may hold newlines) or a JSON item longer than
max_line_bytes is skipped without being held in memory and reported as a RecordError. (csv holds
the record it parses as 4-byte characters: up to 4 * max_line_bytes.)

Parquet and saved datasets compress inside the file, where the upload's expansion limit does not
see: a 2 KB Parquet file can hold 400 MB of rows. Arrow sizes each row before Python sees it: the
bytes of its values (strings and binaries by length, other values by width, lists and structs by
their values' sum). A row larger than max_line_bytes is a RecordError and never a Python object;
past max_total_bytes of rows in all, the upload is a SourceError; and rows become Python objects
a few at a time (PYTHON_ROWS, and max_line_bytes of values). Not bounded: what pyarrow decodes
whole to read a row. That is, of Parquet, a page of a column (a dictionary page too) and a batch
of rows (PARQUET_BATCH_ROWS, fewer where the row group's metadata tells of long rows); of a saved
dataset, a record batch of its Arrow files, decompressed (datasets writes 1,000 rows a batch).

Locations name the file and where the record starts: "data.jsonl:12", "data.csv:7" (lines count
from 1, as in editors), "data.json:item 5 (line 12)", "data.parquet:row 3", "data:train:row 3"
(items and rows count from 0, as in pandas, datasets and jq).

Upload-level problems raise SourceError, whose message starts with the filename: read_records
raises it when called for what shows at once (an empty file), and while iterating for what
shows late (a truncated JSON or Parquet file).
A record that cannot be read is yielded as a RecordError: one bad line costs that line only.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..schemas import json_type

FILE_FORMATS = ("jsonl", "json", "csv", "parquet", "hf_disk")
COMPRESSION_SUFFIXES = ("gz", "bz2", "xz", "zst")  # also the names compression_of returns

CHUNK_BYTES = 256 << 10  # read size; about what a reader holds beyond one record
SNIFF_BYTES = 64 << 10  # how much of a file format detection looks at
PARQUET_BATCH_ROWS = 64  # rows pyarrow decodes at once, at most: few, for long texts
PYTHON_ROWS = 64  # Parquet and Arrow rows made Python objects at once
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # also the start of UTF-32's
UTF16_HINT = "the text looks UTF-16 encoded; re-encode the file as UTF-8"
HF_DICT_FILE = "dataset_dict.json"  # DatasetDict.save_to_disk: {"splits": [...]}, a folder each
HF_STATE_FILE = "state.json"  # Dataset.save_to_disk: lists the Arrow files, in order

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonlines": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_MAGIC = {  # compression -> the bytes its files start with
    "gz": (b"\x1f\x8b",),
    "bz2": tuple(b"BZh" + str(level).encode() for level in range(1, 10)),
    "xz": (b"\xfd7zXZ\x00",),
    "zst": (b"\x28\xb5\x2f\xfd",),
}
_COMPRESSION_NAMES = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}


class SourceError(Exception):
    """The upload as a whole cannot be read; the message starts with the filename."""


@dataclass(frozen=True)
class RecordError:
    """One record that cannot be read, and why."""

    reason: str


# -- compression --------------------------------------------------------------------------------


def compression_of(path: Path) -> str | None:
    """ "gz", "bz2", "xz" or "zst" from the file's first bytes (not its name); None if none."""
    if path.is_dir():
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    return next((c for c, magics in _MAGIC.items() if head.startswith(magics)), None)


def _decompressor(
    src: Path, compression: str, filename: str
) -> tuple[IO[bytes], tuple[type[Exception], ...]]:
    """The decompressed stream, and the exceptions it raises for corrupt or truncated input."""
    corrupt = (OSError, EOFError, lzma.LZMAError, zlib.error)
    if compression != "zst":
        opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
        return opener(src, "rb"), corrupt
    try:
        import zstandard
    except ImportError:
        raise SourceError(
            f"{filename}: is zstd-compressed, but this server cannot read zstd (the zstandard "
            "package is not installed); upload it uncompressed or compressed with gzip, bzip2 "
            "or xz"
        ) from None
    # read_across_frames: zstd files are often several frames (pzstd, concatenation)
    reader = zstandard.ZstdDecompressor().stream_reader(
        open(src, "rb"), read_across_frames=True, closefd=True
    )
    return reader, (*corrupt, zstandard.ZstdError)


def decompress(src: Path, dst: Path, max_bytes: int, *, filename: str | None = None) -> int:
    """Decompress src (its compression told by its magic bytes) into dst, streaming; returns
    the decompressed size. Raises SourceError for a file that is not compressed, is corrupt, or
    would decompress to more than max_bytes: writing stops at the limit and dst is removed.
    `filename` names the upload in errors (default: src's name)."""
    filename = filename or src.name
    compression = compression_of(src)
    if compression is None:
        raise SourceError(f"{filename}: not compressed with {', '.join(COMPRESSION_SUFFIXES)}")
    stream, corrupt = _decompressor(src, compression, filename)
    written = 0
    try:
        with stream, open(dst, "wb") as out:
            while True:
                try:
                    # one byte past the limit is enough to know the output is too large
                    chunk = stream.read(min(CHUNK_BYTES, max_bytes - written + 1))
                except corrupt as e:
                    raise SourceError(
                        f"{filename}: not a valid {_COMPRESSION_NAMES[compression]} file: {e}"
                    ) from e
                if not chunk:
                    return written
                written += len(chunk)
                if written > max_bytes:
                    raise SourceError(
                        f"{filename}: decompresses to more than {max_bytes} bytes, the limit "
                        "for an upload"
                    )
                out.write(chunk)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


# -- format detection ---------------------------------------------------------------------------


def _extension(filename: str) -> str:
    """The format extension, under any compression suffix: "d.jsonl.gz" -> ".jsonl"."""
    name = filename.lower()
    for compression in COMPRESSION_SUFFIXES:
        name = name.removesuffix(f".{compression}")
    return Path(name).suffix


def _check_not_utf16(head: bytes, filename: str) -> None:
    if head.startswith(UTF16_BOMS):
        raise SourceError(
            f"{filename}: starts with a UTF-16 byte-order mark; re-encode the file as UTF-8"
        )
    if _looks_utf16(head):
        raise SourceError(
            f"{filename}: looks UTF-16 encoded (NUL bytes between the characters); "
            "re-encode the file as UTF-8"
        )


def _looks_utf16(raw: bytes) -> bool:
    # UTF-16 puts a NUL byte beside every ASCII character; UTF-8 text has none
    return raw.count(b"\x00") * 4 >= len(raw) > 0


def _sniff_json(head: bytes, extension: str) -> str | None:
    """ "json" or "jsonl" for JSON text, None for anything else."""
    text = head.removeprefix(UTF8_BOM).lstrip()
    if text.startswith(b"["):
        return "json"
    if not text.startswith(b"{"):
        return None
    first, newline, rest = text.partition(b"\n")
    if not newline and len(head) == SNIFF_BYTES:  # one line that goes on past what was read
        return "json" if extension == ".json" else "jsonl"
    try:
        value = json.loads(first)
    except (ValueError, RecursionError):  # '{' alone on its line: an indented document
        return "json"
    if rest.strip():  # a second line after a complete object
        return "jsonl"
    wrapper = len(value) == 1 and isinstance(next(iter(value.values())), list)
    return "json" if extension == ".json" and wrapper else "jsonl"


def detect_file_format(path: Path, filename: str) -> str:
    """One of FILE_FORMATS, from the content where it tells (Parquet's magic, a datasets folder,
    JSON's first bytes) and the extension where it does not (.jsonl, .csv). Raises SourceError
    for an empty or unknown file, or a folder that save_to_disk did not write."""
    if path.is_dir():
        if (path / HF_DICT_FILE).is_file() or (path / HF_STATE_FILE).is_file():
            return "hf_disk"
        raise _not_a_saved_dataset(filename)
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        raise SourceError(f"{filename}: empty file: no rows")
    if compression := next((c for c, m in _MAGIC.items() if head.startswith(m)), None):
        raise SourceError(
            f"{filename}: is {_COMPRESSION_NAMES[compression]}-compressed; decompress it first"
        )
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK\x03\x04"):
        raise SourceError(
            f"{filename}: is a zip archive, which is not supported; upload the file itself, "
            "or compress it with gzip, bzip2, xz or zstd"
        )
    extension = _extension(filename)
    if _EXTENSIONS.get(extension) == "parquet":
        raise SourceError(f"{filename}: not a Parquet file (it does not start with PAR1)")
    _check_not_utf16(head, filename)
    if _EXTENSIONS.get(extension) in ("jsonl", "csv"):
        return _EXTENSIONS[extension]
    if sniffed := _sniff_json(head, extension):
        return sniffed
    if extension == ".json":  # not JSON after all: the JSON reader says what it found
        return "json"
    raise SourceError(
        f"{filename}: unknown file format: expected JSON Lines (.jsonl), JSON (.json), CSV "
        "(.csv), Parquet (.parquet), optionally compressed (.gz, .bz2, .xz, .zst), or a "
        "folder written by datasets' save_to_disk"
    )


# -- reading ------------------------------------------------------------------------------------


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
    if file_format not in FILE_FORMATS:
        raise SourceError(
            f"{filename}: unknown file format {file_format!r}; known: {', '.join(FILE_FORMATS)}"
        )
    if split is not None and file_format != "hf_disk":
        raise ValueError(f"split applies to hf_disk only, not {file_format}")
    expansion = _Expansion(filename, max_total_bytes)
    if file_format == "hf_disk":
        return _read_hf_disk(path, filename, split, max_line_bytes, expansion)
    if path.is_dir():
        raise SourceError(f"{filename}: is a folder, not a {file_format} file")
    if path.stat().st_size == 0:
        raise SourceError(f"{filename}: empty file: no rows")
    if file_format == "parquet":
        return _read_parquet(path, filename, max_line_bytes, expansion)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[file_format]
    return reader(path, filename, max_line_bytes)


def _open_text(path: Path, filename: str) -> IO[bytes]:
    """The file opened at its text, past a UTF-8 byte-order mark; UTF-16 is refused whole."""
    stream = open(path, "rb")
    head = stream.read(SNIFF_BYTES)
    try:
        _check_not_utf16(head, filename)
    except SourceError:
        stream.close()
        raise
    stream.seek(len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0)
    return stream


def _too_long(what: str, length: int, limit: int) -> RecordError:
    return RecordError(f"{what} is {length} bytes, longer than the limit of {limit} bytes")


def _lines(
    stream: IO[bytes],
    max_line_bytes: int,
    on_dropped: Callable[[bytes | bytearray], None] | None = None,
) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without its newline, its length) for each line. The line is None when
    it is longer than max_line_bytes: its bytes were counted and dropped chunk by chunk, so a
    line of any length costs at most max_line_bytes + CHUNK_BYTES of memory. on_dropped, if
    given, sees the dropped bytes piece by piece, in order, before the line is yielded."""
    lineno = 0
    held = bytearray()  # the current line's bytes from earlier chunks
    dropped = 0  # > 0 while passing over a line that is too long: its length so far
    while chunk := stream.read(CHUNK_BYTES):
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            lineno += 1
            length = dropped + len(held) + end - start
            if length > max_line_bytes:
                if on_dropped:
                    on_dropped(held)
                    on_dropped(chunk[start:end])
                yield lineno, None, length
            else:
                yield lineno, bytes(held) + chunk[start:end] if held else chunk[start:end], length
            held.clear()
            dropped = 0
            start = end + 1
        rest = len(chunk) - start
        if dropped or len(held) + rest > max_line_bytes:
            if on_dropped:
                on_dropped(held)
                on_dropped(chunk[start:])
            dropped += len(held) + rest
            held.clear()
        else:
            held += memoryview(chunk)[start:]
    if dropped or held:  # a last line without a newline
        length = dropped + len(held)
        yield lineno + 1, None if dropped else bytes(held), length


def _not_utf8(raw: bytes, bad: int, where: str = "") -> RecordError:
    """Why raw (a line, item or cell) is not UTF-8, with the encoding it looks like."""
    reason = f"not valid UTF-8 (byte {bad + 1}{where})"
    if raw.startswith(UTF16_BOMS) or _looks_utf16(raw):
        return RecordError(f"{reason}: {UTF16_HINT}")
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:  # 5 byte values cp1252 leaves undefined: not such text
        return RecordError(reason)
    char = raw[bad : bad + 1].decode("cp1252")
    return RecordError(
        f"{reason}: the text looks Latin-1/Windows-1252 encoded (byte 0x{raw[bad]:02X} is "
        f"'{char}' there); re-encode the file as UTF-8"
    )


def _decode(raw: bytes, where: str = "") -> str | RecordError:
    if b"\x00" in raw and _looks_utf16(raw):  # NULs are valid UTF-8, but never in JSON text
        return RecordError(f"not valid UTF-8 (NUL at byte {raw.index(0) + 1}): {UTF16_HINT}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _not_utf8(raw, e.start, where)


def _parse_object(raw: bytes, start: tuple[int, int] | None = None) -> dict | RecordError:
    """A JSON object from a JSONL line (start None) or a JSON item that starts at (line, col)."""
    text = _decode(raw, "" if start is None else " of the item")
    if isinstance(text, RecordError):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if start is None:
            return RecordError(f"invalid JSON: {e.msg} (col {e.colno})")
        line, column = start
        # json counts the item's first line from the item's start, not from the line's
        column = e.colno + (column - 1 if e.lineno == 1 else 0)
        return RecordError(f"invalid JSON: {e.msg} (line {line + e.lineno - 1}, col {column})")
    except RecursionError:
        return RecordError("invalid JSON: nested too deeply")
    if not isinstance(value, dict):
        return RecordError(f"expected a JSON object, got {json_type(value)}")
    return value


def _read_jsonl(path: Path, filename: str, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
    with _open_text(path, filename) as stream:
        for lineno, line, length in _lines(stream, max_line_bytes):
            location = f"{filename}:{lineno}"
            if line is None:
                yield location, _too_long("line", length, max_line_bytes)
            elif line.strip():
                yield location, _parse_object(line)


# -- JSON, streamed -----------------------------------------------------------------------------

_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_STRUCTURE = re.compile(rb'["\[\]{},]')  # what matters outside a string
# a string's body from just past its opening quote: up to its closing quote, or a backslash
# that is the buffer's last byte (an escape whose second byte is still to be read). Possessive
# quantifiers: a backtracking loop would hold a stack entry per escape, memory ~ string length
_STRING_BODY = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_KEY = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
MAX_KEY_BYTES = 4096


class _Cursor:
    """A binary file read in chunks, with a position that counts lines as it passes them.
    While `kept` is set, the buffer keeps its bytes from there on across refills (an item being
    collected); otherwise it keeps nothing before the position. JSON's structural characters
    are ASCII, and UTF-8 never uses ASCII bytes inside a multi-byte character, so scanning
    bytes is safe."""

    def __init__(self, stream: IO[bytes], filename: str):
        self.stream = stream
        self.filename = filename
        self.buf = bytearray()  # dropping its head in place costs no copy
        self.base = 0  # file offset of buf[0]
        self.pos = 0
        self.line = 1
        self.line_start = 0  # file offset of the current line's first byte
        self.kept: int | None = None

    def fill(self) -> bool:
        """Append the next chunk; False at end of file."""
        chunk = self.stream.read(CHUNK_BYTES)
        if not chunk:
            return False
        drop = self.pos if self.kept is None else self.kept
        del self.buf[:drop]
        self.buf += chunk
        self.base += drop
        self.pos -= drop
        if self.kept is not None:
            self.kept = 0
        return True

    def advance(self, to: int) -> None:
        if newlines := self.buf.count(b"\n", self.pos, to):
            self.line += newlines
            self.line_start = self.base + self.buf.rfind(b"\n", self.pos, to) + 1
        self.pos = to

    def column(self) -> int:
        """The position's column, from 1, in bytes."""
        return self.base + self.pos - self.line_start + 1

    def next_byte(self) -> bytes:
        """Move past whitespace; the byte there (b"" at end of file)."""
        while not (m := _NON_SPACE.search(self.buf, self.pos)):
            self.advance(len(self.buf))
            if not self.fill():
                return b""
        self.advance(m.start())
        return bytes(self.buf[m.start() : m.start() + 1])

    def expect(self, wanted: bytes, problem: Callable[[bytes], str]) -> None:
        """Move past `wanted`, the next non-space byte, or raise SourceError(problem(found))."""
        found = self.next_byte()
        if found != wanted:
            raise SourceError(f"{self.filename}:{self.line}: {problem(found)}")
        self.advance(self.pos + 1)

    def key(self) -> str:
        """An object key (the cursor at its opening quote), decoded."""
        self.kept = self.pos
        while not (m := _KEY.match(self.buf, self.kept)):
            if len(self.buf) - self.kept > MAX_KEY_BYTES or not self.fill():
                raise SourceError(f"{self.filename}:{self.line}: an object key is not closed")
        self.kept = None
        self.advance(m.end())
        try:
            return json.loads(m[0])
        except ValueError as e:
            raise SourceError(f"{self.filename}:{self.line}: invalid object key: {e}") from e

    def item(self, limit: int) -> tuple[bytes | None, int, bytes]:
        """Move past one array item and the ',' or ']' after it. Returns the item's bytes (None
        if it is longer than limit: scanned, not kept), its length, and that ',' or ']'."""
        start, first_line = self.base + self.pos, self.line
        self.kept = self.pos
        depth, in_string, starved = 0, False, False
        while True:
            if self.pos >= len(self.buf) or starved:
                starved = False
                if self.kept is not None and len(self.buf) - self.kept > limit:
                    self.kept = None
                if not self.fill():
                    raise SourceError(
                        f"{self.filename}:{first_line}: the file ends inside the JSON value that "
                        "starts here (a string or bracket is not closed, or it is truncated)"
                    )
            if in_string:
                end = _STRING_BODY.match(self.buf, self.pos).end()
                if end < len(self.buf) and self.buf[end] == ord('"'):
                    self.advance(end + 1)
                    in_string = False
                else:  # the string, or an escape in it, goes on in the next chunk
                    self.advance(end)
                    starved = True
                continue
            m = _STRUCTURE.search(self.buf, self.pos)
            if m is None:
                self.advance(len(self.buf))
                continue
            self.advance(m.end())
            char = m[0]
            if char == b'"':
                in_string = True
            elif char in (b"[", b"{"):
                depth += 1
            elif depth and char in (b"]", b"}"):
                depth -= 1
            elif not depth and char in (b",", b"]"):  # the item ends here
                length = self.base + m.start() - start
                item = None
                if self.kept is not None and length <= limit:
                    item = bytes(self.buf[self.kept : m.start()])
                self.kept = None
                return item, length, char
            # a '}' at depth 0 stays in the item, for the JSON parser to report


def _read_json(path: Path, filename: str, max_item_bytes: int) -> Iterator[tuple[str, Any]]:
    with _open_text(path, filename) as stream:
        cursor = _Cursor(stream, filename)
        opener = cursor.next_byte()
        wrapper_key = None
        if opener == b"{":
            cursor.advance(cursor.pos + 1)
            if cursor.next_byte() != b'"':
                raise SourceError(f"{filename}: {_json_shape_problem('an empty object')}")
            wrapper_key = cursor.key()
            cursor.expect(b":", lambda found: f"expected ':' after the key, found {found!r}")
            cursor.expect(b"[", lambda _: _json_shape_problem(f"field '{wrapper_key}' is no array"))
        elif opener == b"[":
            cursor.advance(cursor.pos + 1)
        elif not opener:
            raise SourceError(f"{filename}: holds no JSON, only whitespace")
        else:
            raise SourceError(f"{filename}: {_json_shape_problem(f'it starts with {opener!r}')}")
        yield from _json_items(cursor, filename, max_item_bytes)
        if wrapper_key is not None:
            cursor.expect(
                b"}",
                lambda _: _json_shape_problem(f"the object has more fields than '{wrapper_key}'"),
            )
        if cursor.next_byte():
            raise SourceError(f"{filename}:{cursor.line}: unexpected data after the records")


def _json_shape_problem(found: str) -> str:
    return (
        "expected a JSON array of records, or an object whose only field is that array (as "
        f'{{"data": [...]}}); {found}'
    )


def _json_items(cursor: _Cursor, filename: str, max_item_bytes: int) -> Iterator[tuple[str, Any]]:
    """The items of the array whose '[' the cursor just passed, and the ']' that closes it."""
    if cursor.next_byte() == b"]":
        cursor.advance(cursor.pos + 1)
        return
    index, end = 0, b","
    while end == b",":
        cursor.next_byte()
        line, column = cursor.line, cursor.column()
        item, length, end = cursor.item(max_item_bytes)
        location = f"{filename}:item {index} (line {line})"
        if item is None:
            yield location, _too_long("item", length, max_item_bytes)
        else:
            yield location, _parse_object(item, (line, column))
        index += 1


# -- CSV ----------------------------------------------------------------------------------------


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


def _read_csv(path: Path, filename: str, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
    # csv's only cell limit is process-wide; a cell may be as long as a record (never lowered,
    # so other readers in the process keep theirs)
    if csv.field_size_limit() < max_line_bytes:
        csv.field_size_limit(max_line_bytes)
    record = _CsvRecord()
    skip = _CsvSkip()

    with _open_text(path, filename) as stream:
        # _lines hands over the pieces of a line too long to hold, for skip to follow
        lines = _lines(stream, max_line_bytes, skip.feed)

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
                yield f"{filename}:{start}", _csv_too_long(record, max_line_bytes)
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


def _csv_too_long(record: _CsvRecord, limit: int) -> RecordError:
    if record.end == record.start:
        return _too_long("line", record.size, limit)
    reason = _too_long("record", record.size, limit).reason
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
        return _not_utf8(raw, len(cell[: e.start].encode("utf-8", "surrogateescape")), where)
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


# -- Parquet and saved datasets (Arrow) ---------------------------------------------------------


def _pyarrow(filename: str, file_format: str):
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise SourceError(
            f"{filename}: reading {file_format} needs pyarrow, which the dataset service does "
            "not have installed"
        ) from None
    return pyarrow


class _Expansion:
    """The decoded bytes of an upload's records so far, against max_total_bytes: Parquet and
    Arrow compress inside the file, so the upload's own expansion limit does not see them."""

    def __init__(self, filename: str, limit: int | None):
        self.filename = filename
        self.limit = limit
        self.total = 0

    def room(self) -> float:
        """How many more bytes fit."""
        return float("inf") if self.limit is None else self.limit - self.total

    def add(self, size: int, location: str) -> None:
        self.total += size
        if self.limit is not None and self.total > self.limit:
            raise SourceError(
                f"{self.filename}: expands to more than {self.limit} bytes of values, the limit "
                f"for an upload (passed at {location})"
            )


def _value_bytes(pa, array) -> Any:
    """Each row's decoded size (a numpy int64 array): strings and binaries by their length,
    other values by their width, lists, maps and structs by the sum of their values, nulls 0.
    Computed by Arrow and numpy, without making Python objects of the values."""
    import numpy as np  # pyarrow's own dependency

    string_arrays = (pa.StringArray, pa.BinaryArray, pa.LargeStringArray, pa.LargeBinaryArray)
    if isinstance(array.type, pa.ExtensionType):
        return _value_bytes(pa, array.storage)
    if isinstance(array, pa.DictionaryArray):
        return _value_bytes(pa, array.dictionary_decode())
    n = len(array)
    if n == 0 or array.null_count == n:
        return np.zeros(n, np.int64)
    if isinstance(array, string_arrays):
        sizes = np.diff(_offsets(pa, array))
    elif isinstance(array, (pa.ListArray, pa.LargeListArray)):  # maps too
        offsets = _offsets(pa, array)
        first, last = int(offsets[0]), int(offsets[-1])
        sums = np.zeros(last - first + 1, np.int64)
        np.cumsum(_value_bytes(pa, array.values.slice(first, last - first)), out=sums[1:])
        sizes = sums[offsets[1:] - first] - sums[offsets[:-1] - first]
    elif isinstance(array, pa.FixedSizeListArray):
        sizes = np.zeros(n, np.int64)
        parents = pa.compute.list_parent_indices(array).to_numpy(zero_copy_only=False)
        np.add.at(sizes, parents, _value_bytes(pa, pa.compute.list_flatten(array)))
    elif isinstance(array, pa.StructArray):
        sizes = np.zeros(n, np.int64)
        for field in array.flatten():  # the fields of this slice, null where the struct is
            sizes += _value_bytes(pa, field)
    else:
        try:
            sizes = np.full(n, max(1, array.type.bit_width // 8), np.int64)
        except ValueError:  # not fixed-width
            if str(array.type) in ("string_view", "binary_view"):  # pyarrow 16 on
                sizes = _value_bytes(pa, array.cast(pa.large_binary()))
            else:  # unions and the like: what each row references
                sizes = np.array([array.slice(i, 1).nbytes for i in range(n)])
    sizes = sizes.astype(np.int64, copy=False)
    if array.null_count:  # a null may still span bytes (a list's offsets); it holds none
        sizes = np.where(array.is_valid().to_numpy(zero_copy_only=False), sizes, 0)
    return sizes


def _offsets(pa, array) -> Any:
    """The n + 1 offsets of a string, binary or list array's rows into its values (which a
    slice shares whole), from its buffer: Array.offsets.to_numpy() is 100 times slower."""
    import numpy as np  # pyarrow's own dependency

    large = isinstance(array, (pa.LargeStringArray, pa.LargeBinaryArray, pa.LargeListArray))
    offsets = np.frombuffer(array.buffers()[1], np.int64 if large else np.int32)
    return offsets[array.offset : array.offset + len(array) + 1].astype(np.int64)


def _batch_records(
    pa,
    batch,
    label: str,
    first_row: int,
    max_record_bytes: int,
    expansion: _Expansion,
) -> Iterator[tuple[str, Any]]:
    """The rows of an Arrow record batch, made Python objects a few at a time: at most
    PYTHON_ROWS rows and max_record_bytes of values (or one row). A row larger than
    max_record_bytes is a RecordError, never made a Python object."""
    import numpy as np  # pyarrow's own dependency

    sizes = np.zeros(batch.num_rows, np.int64)
    for column in batch.columns:
        sizes += _value_bytes(pa, column)
    start = 0
    while start < len(sizes):
        size = int(sizes[start])
        if size > max_record_bytes:
            location = f"{label}:row {first_row + start}"
            expansion.add(size, location)
            yield location, _too_long("record", size, max_record_bytes)
            start += 1
            continue
        # the rows from start whose sizes add up to max_record_bytes at most (one at least)
        held = np.cumsum(sizes[start : start + PYTHON_ROWS])
        count = int(np.searchsorted(held, max_record_bytes, side="right"))
        records = batch.slice(start, count).to_pylist()
        if expansion.room() >= held[count - 1]:
            expansion.add(int(held[count - 1]), label)
            for row, record in enumerate(records, first_row + start):
                yield f"{label}:row {row}", record
        else:  # the limit falls in these rows: name the row that passes it
            for i, record in enumerate(records, start):
                location = f"{label}:row {first_row + i}"
                expansion.add(int(sizes[i]), location)
                yield location, record
        start += count


def _read_parquet(
    path: Path, filename: str, max_record_bytes: int, expansion: _Expansion
) -> Iterator[tuple[str, Any]]:
    pa = _pyarrow(filename, "parquet")
    row = 0
    try:
        # pre_buffer (the default) reads a whole row group at once, often 100+ MB; buffered
        # reads hold one page per column (a 143 MB row group: 154 MB of Arrow memory -> 11 MB)
        with pa.parquet.ParquetFile(path, buffer_size=CHUNK_BYTES, pre_buffer=False) as parquet:
            for group in range(parquet.num_row_groups):
                # a batch is decoded whole: fewer rows where the metadata tells they are long,
                # about max_record_bytes a batch
                meta = parquet.metadata.row_group(group)
                row_bytes = max(1, meta.total_byte_size // max(1, meta.num_rows))
                rows = max(1, min(PARQUET_BATCH_ROWS, max_record_bytes // row_bytes))
                batches = parquet.iter_batches(
                    batch_size=rows, row_groups=[group], use_threads=False
                )
                for batch in batches:
                    yield from _batch_records(pa, batch, filename, row, max_record_bytes, expansion)
                    row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{filename}: not a readable Parquet file: {e}") from e


def _read_hf_disk(
    folder: Path, filename: str, split: str | None, max_record_bytes: int, expansion: _Expansion
) -> Iterator[tuple[str, Any]]:
    if (folder / HF_DICT_FILE).is_file():
        splits = _json_file(folder / HF_DICT_FILE, filename).get("splits")
        if not (isinstance(splits, list) and all(isinstance(s, str) for s in splits)):
            raise SourceError(f"{filename}: {HF_DICT_FILE} has no list of splits")
        if split is not None:
            if split not in splits:
                raise SourceError(
                    f"{filename}: has no split '{split}'; its splits: {', '.join(splits)}"
                )
            splits = [split]
        for name in splits:
            yield from _read_arrow_dataset(
                _inside(folder, name, filename),
                f"{filename}:{name}",
                filename,
                max_record_bytes,
                expansion,
            )
    elif (folder / HF_STATE_FILE).is_file():
        if split is not None:
            raise SourceError(f"{filename}: holds one dataset, no splits; cannot read '{split}'")
        yield from _read_arrow_dataset(folder, filename, filename, max_record_bytes, expansion)
    else:
        raise _not_a_saved_dataset(filename)


def _not_a_saved_dataset(filename: str) -> SourceError:
    return SourceError(
        f"{filename}: a folder that is not a saved Hugging Face dataset (no {HF_DICT_FILE} or "
        f"{HF_STATE_FILE}, as datasets' save_to_disk writes)"
    )


def _read_arrow_dataset(
    folder: Path, label: str, filename: str, max_record_bytes: int, expansion: _Expansion
) -> Iterator[tuple[str, Any]]:
    """The rows of one saved Dataset: its Arrow stream files in state.json's order."""
    pa = _pyarrow(filename, "hf_disk")
    state = _json_file(folder / HF_STATE_FILE, filename)
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError) as e:
        raise SourceError(f"{label}: {HF_STATE_FILE} lists no data files (_data_files)") from e
    row = 0
    for name in names:
        arrow_file = _inside(folder, name, filename)
        try:  # read, not memory-mapped: mapped pages would count against the service's memory
            with pa.OSFile(str(arrow_file)) as source:
                for batch in pa.ipc.open_stream(source):  # a batch is read whole
                    yield from _batch_records(pa, batch, label, row, max_record_bytes, expansion)
                    row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{label}: cannot read {name}: {e}") from e


def _json_file(path: Path, filename: str) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SourceError(f"{filename}: unreadable {path.name}: {e}") from e
    if not isinstance(value, dict):
        raise SourceError(f"{filename}: {path.name} is not a JSON object")
    return value


def _inside(folder: Path, name: str, filename: str) -> Path:
    """folder/name, refusing a name (from the upload's own metadata) that leads out of it."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise SourceError(f"{filename}: refers to {name!r}, outside the dataset folder")
    return target

"""JSON Lines and JSON files, read record by record.

    jsonl  one JSON object per line; blank lines skipped
    json   a top-level array of objects, or an object whose only field is that array
           ({"data": [...]}); streamed item by item, never loaded whole
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from ..schemas import json_type
from . import limits
from .errors import RecordError, SourceError
from .limits import ReadRequest, too_long
from .text import decode, lines, open_text


def parse_object(raw: bytes, start: tuple[int, int] | None = None) -> dict | RecordError:
    """A JSON object from a JSONL line (start None) or a JSON item that starts at (line, col).
    orjson parses (3x faster); what it refuses or may read differently (NaN and Infinity,
    lone surrogates, invalid UTF-8, and any number it returns as a float: an integer beyond
    64 bits is one) goes through json, which also words the errors."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    else:
        if isinstance(value, dict) and not _holds_float(value):
            return value
    text = decode(raw, "" if start is None else " of the item")
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


def _holds_float(value: Any) -> bool:
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return isinstance(value, float)
    return any(map(_holds_float, value))


def read_jsonl(path: Path, request: ReadRequest) -> Iterator[tuple[str, Any]]:
    filename, max_line_bytes = request.filename, request.max_line_bytes
    with open_text(path, filename) as stream:
        for lineno, line, length in lines(stream, max_line_bytes):
            location = f"{filename}:{lineno}"
            if line is None:
                yield location, too_long("line", length, max_line_bytes)
            elif line.strip():
                yield location, parse_object(line)


# -- JSON, streamed -----------------------------------------------------------------------------

_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_STRUCTURE = re.compile(rb'["\[\]{},]')  # what matters outside a string
# a string's body from just past its opening quote: up to its closing quote, or a backslash
# that is the buffer's last byte (an escape whose second byte is still to be read). Possessive
# quantifiers: a backtracking loop would hold a stack entry per escape, memory ~ string length
_STRING_BODY = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_KEY = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


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
        chunk = self.stream.read(limits.CHUNK_BYTES)
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
            if len(self.buf) - self.kept > limits.MAX_KEY_BYTES or not self.fill():
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
                body = _STRING_BODY.match(self.buf, self.pos)
                assert body is not None  # it matches the empty string at least
                end = body.end()
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


def read_json(path: Path, request: ReadRequest) -> Iterator[tuple[str, Any]]:
    filename, max_item_bytes = request.filename, request.max_line_bytes
    with open_text(path, filename) as stream:
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
            yield location, too_long("item", length, max_item_bytes)
        else:
            yield location, parse_object(item, (line, column))
        index += 1

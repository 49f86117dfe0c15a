"""Text files read in bounded memory: UTF-8 only (a byte-order mark skipped, UTF-16 refused with
a hint), line by line with over-long lines counted and dropped, never held."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from . import limits
from .errors import RecordError, SourceError

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # also the start of UTF-32's
UTF16_HINT = "the text looks UTF-16 encoded; re-encode the file as UTF-8"


def check_not_utf16(head: bytes, filename: str) -> None:
    if head.startswith(UTF16_BOMS):
        raise SourceError(
            f"{filename}: starts with a UTF-16 byte-order mark; re-encode the file as UTF-8"
        )
    if looks_utf16(head):
        raise SourceError(
            f"{filename}: looks UTF-16 encoded (NUL bytes between the characters); "
            "re-encode the file as UTF-8"
        )


def looks_utf16(raw: bytes) -> bool:
    # UTF-16 puts a NUL byte beside every ASCII character; UTF-8 text has none
    return raw.count(b"\x00") * 4 >= len(raw) > 0


def open_text(path: Path, filename: str) -> IO[bytes]:
    """The file opened at its text, past a UTF-8 byte-order mark; UTF-16 is refused whole."""
    stream = open(path, "rb")
    head = stream.read(limits.SNIFF_BYTES)
    try:
        check_not_utf16(head, filename)
    except SourceError:
        stream.close()
        raise
    stream.seek(len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0)
    return stream


def lines(
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
    while chunk := stream.read(limits.CHUNK_BYTES):
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


def not_utf8(raw: bytes, bad: int, where: str = "") -> RecordError:
    """Why raw (a line, item or cell) is not UTF-8, with the encoding it looks like."""
    reason = f"not valid UTF-8 (byte {bad + 1}{where})"
    if raw.startswith(UTF16_BOMS) or looks_utf16(raw):
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


def decode(raw: bytes, where: str = "") -> str | RecordError:
    if b"\x00" in raw and looks_utf16(raw):  # NULs are valid UTF-8, but never in JSON text
        return RecordError(f"not valid UTF-8 (NUL at byte {raw.index(0) + 1}): {UTF16_HINT}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return not_utf8(raw, e.start, where)

"""Compressed uploads (gz, bz2, xz, zst), told by their first bytes, decompressed as a stream
up to the upload's expansion limit."""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from . import limits
from .errors import SourceError

COMPRESSION_SUFFIXES = ("gz", "bz2", "xz", "zst")  # also the names compression_of returns
MAGIC = {  # compression -> the bytes its files start with
    "gz": (b"\x1f\x8b",),
    "bz2": tuple(b"BZh" + str(level).encode() for level in range(1, 10)),
    "xz": (b"\xfd7zXZ\x00",),
    "zst": (b"\x28\xb5\x2f\xfd",),
}
COMPRESSION_NAMES = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}


def compression_in(head: bytes) -> str | None:
    """The compression whose magic bytes `head` starts with, or None."""
    return next((c for c, magics in MAGIC.items() if head.startswith(magics)), None)


def compression_of(path: Path) -> str | None:
    """ "gz", "bz2", "xz" or "zst" from the file's first bytes (not its name); None if none."""
    if path.is_dir():
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    return compression_in(head)


def _decompressor(
    src: Path, compression: str, filename: str
) -> tuple[IO[bytes], tuple[type[Exception], ...]]:
    """The decompressed stream, and the exceptions it raises for corrupt or truncated input."""
    corrupt = (OSError, EOFError, lzma.LZMAError, zlib.error)
    if compression != "zst":
        # GzipFile is no IO[bytes] to typeshed, though it reads like one
        openers: dict[str, Callable[[Path, str], Any]] = {
            "gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
        return openers[compression](src, "rb"), corrupt
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
                    chunk = stream.read(min(limits.CHUNK_BYTES, max_bytes - written + 1))
                except corrupt as e:
                    raise SourceError(
                        f"{filename}: not a valid {COMPRESSION_NAMES[compression]} file: {e}"
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

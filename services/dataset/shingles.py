"""Duplicate detection's text work for a batch of rows at once, in numpy: normalization to
bytes, tokens, their CRC-32s and the word-bigram shingles, the same as dedup.py's per-row
definitions give (normalize_for_dedup, its tokens, zlib.crc32 per token).

    normalize_batch(texts) -> NormalizedBatch   (each row's normalized UTF-8, back to back)
    shingles(batch)        -> (rows with >= MIN_TOKENS tokens, their shingle counts, shingles)

A row is "plain" when it is ASCII apart from FIELD_MARK (the symbol ingest puts between a row's
fields): there NFKC changes nothing and casefold is lower(), so normalization is a byte table
and a whitespace collapse over the whole batch, and tokens are runs of [a-z0-9_] bytes. Other
rows take the per-row Python path. A Python object per token, not the maths, was the cost.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

MIN_TOKENS = 5
FIELD_MARK = "\u241f"  # SYMBOL FOR UNIT SEPARATOR: a separator, which NFKC and casefold keep
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[^\W{_CJK}]+|[{_CJK}]")
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
# A token longer than this is hashed by zlib alone: the vectorized CRC runs one step per byte
# of the longest token.
_VECTOR_TOKEN_BYTES = 64

# Byte tables for bytes.translate (a C loop, far faster than indexing a numpy table):
# str.split()'s whitespace among single bytes is \t \n \v \f \r, \x1c-\x1f and space.
_SPACE_BYTES = bytes([9, 10, 11, 12, 13, 28, 29, 30, 31, 32])
_IS_SPACE = bytes(int(b in _SPACE_BYTES) for b in range(256))
_IS_TOKEN = bytes(int(b < 128 and (chr(b).isalnum() or chr(b) == "_")) for b in range(256))
# lower-case ASCII letters, every whitespace byte a space
_FOLD = bytes(32 if b in _SPACE_BYTES else b + 32 if 65 <= b <= 90 else b for b in range(256))
_MARK = FIELD_MARK.encode()
_SEPARATOR = b"\x00"  # between rows in a batch: neither whitespace nor a token byte


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()


def normalize_for_dedup(text: str) -> str:
    """NFKC, casefold, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass
class NormalizedBatch:
    """The rows' normalized text as UTF-8, back to back: row i is data[starts[i]:ends[i]].
    Between plain rows lies one separator byte, so no token spans two rows."""

    data: np.ndarray  # uint8
    starts: np.ndarray  # int64
    ends: np.ndarray
    plain: np.ndarray  # bool: tokens are the [a-z0-9_] runs of the row's bytes

    def __len__(self) -> int:
        return len(self.starts)

    def head(self, rows: int) -> NormalizedBatch:
        return NormalizedBatch(self.data, self.starts[:rows], self.ends[:rows], self.plain[:rows])

    def row(self, index: int) -> memoryview:
        return memoryview(self.data)[self.starts[index]:self.ends[index]]  # type: ignore[arg-type]


def normalize_batch(texts: list[str]) -> NormalizedBatch:
    encoded = [text.encode() for text in texts]
    # each character beyond ASCII adds 1-3 bytes to the encoding, a FIELD_MARK exactly 2
    plain = np.fromiter((len(raw) - len(text) == 2 * text.count(FIELD_MARK)
                         for raw, text in zip(encoded, texts, strict=True)), bool, len(texts))
    data, starts, ends = _normalize_plain(encoded)
    if plain.all():
        return NormalizedBatch(data, starts, ends, plain)
    # Rows NFKC or casefold may change: normalized one by one, the batch rebuilt in row order
    parts = [data[starts[index]:ends[index]].tobytes() if plain[index]
             else normalize_for_dedup(text).encode() for index, text in enumerate(texts)]
    starts, ends = _bounds(parts)
    return NormalizedBatch(np.frombuffer(_SEPARATOR.join(parts), np.uint8), starts, ends, plain)


def _bounds(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Where each part lies in _SEPARATOR.join(parts)."""
    sizes = np.fromiter(map(len, parts), np.int64, len(parts))
    starts = np.zeros(len(parts), np.int64)
    np.cumsum(sizes[:-1] + 1, out=starts[1:])
    return starts, starts + sizes


def _normalize_plain(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower-case every byte, and of each whitespace run keep one space, unless the run begins
    or ends its row. Correct for plain rows; the others' bytes are replaced afterwards."""
    joined = _SEPARATOR.join(encoded)
    starts, ends = _bounds(encoded)
    folded = np.frombuffer(joined.translate(_FOLD), np.uint8)
    space = np.frombuffer(joined.translate(_IS_SPACE), bool).copy()
    boundary = np.zeros(len(space) + 2, bool)  # a row's edge, at its index + 1
    boundary[starts] = boundary[ends + 1] = True
    run_starts = np.flatnonzero(space & ~np.r_[False, space[:-1]])
    run_ends = np.flatnonzero(space & ~np.r_[space[1:], False])
    inner = ~boundary[run_starts] & ~boundary[run_ends + 2]
    space[run_starts[inner]] = False  # what stays of an inner run: its first byte
    dropped = np.flatnonzero(space)
    if not len(dropped):
        return folded, starts, ends
    dropped_before_start = np.searchsorted(dropped, starts)
    dropped_before_end = np.searchsorted(dropped, ends)
    return (np.delete(folded, dropped), starts - dropped_before_start,
            ends - dropped_before_end)


def shingles(batch: NormalizedBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (indices into the batch) with at least MIN_TOKENS tokens, how many shingles each has,
    and their 32-bit shingle hashes back to back (uint64), in row order."""
    rows, counts, hashes = _plain_shingles(batch)
    if batch.plain.all():
        return rows, counts, hashes
    per_row = dict(zip(rows.tolist(), np.split(hashes, np.cumsum(counts)[:-1]), strict=True)
                   ) if len(rows) else {}
    for index in np.flatnonzero(~batch.plain).tolist():
        tokens = _TOKEN_RE.findall(batch.row(index).tobytes().decode())
        if len(tokens) >= MIN_TOKENS:
            token_hashes = np.fromiter((zlib.crc32(t.encode()) for t in tokens), np.uint64,
                                       len(tokens))
            per_row[index] = _bigram_hashes(token_hashes[:-1], token_hashes[1:])
    rows = np.array(sorted(per_row), dtype=np.int64)
    parts = [per_row[row] for row in rows.tolist()]
    counts = np.fromiter(map(len, parts), np.int64, len(parts))
    return rows, counts, np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _bigram_hashes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    # multiply-shift to a 32-bit shingle hash: the MinHash functions take 32-bit inputs
    return (((first << np.uint64(32)) | second) * _SHINGLE_MULTIPLIER) >> np.uint64(32)


def _plain_shingles(batch: NormalizedBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    token = np.frombuffer(batch.data.tobytes().translate(_IS_TOKEN), bool)
    edges = np.flatnonzero(np.diff(token, prepend=False, append=False))
    token_starts, token_ends = edges[0::2], edges[1::2]
    row_of = np.searchsorted(batch.starts, token_starts, side="right") - 1
    keep = batch.plain[row_of]
    token_starts, token_ends, row_of = token_starts[keep], token_ends[keep], row_of[keep]
    tokens_per_row = np.bincount(row_of, minlength=len(batch))
    eligible = tokens_per_row >= MIN_TOKENS
    token_hashes = _crc32(batch.data, token_starts, token_ends - token_starts)
    pair = (row_of[1:] == row_of[:-1]) & eligible[row_of[:-1]]
    hashes = _bigram_hashes(token_hashes[:-1][pair], token_hashes[1:][pair])
    rows = np.flatnonzero(eligible)
    return rows, tokens_per_row[rows] - 1, hashes


def _crc32(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """zlib.crc32 of each data[start:start + length], as uint64: one table step per byte
    position, over the tokens at least that long (sorted longest first)."""
    out = np.empty(len(starts), np.uint64)
    long = lengths > _VECTOR_TOKEN_BYTES
    for index in np.flatnonzero(long).tolist():
        out[index] = zlib.crc32(data[starts[index]:starts[index] + lengths[index]])  # type: ignore[arg-type]
    short = np.flatnonzero(~long)
    # lengths fit a byte: numpy's stable sort of uint8 keys is a radix sort, O(n)
    order = short[np.argsort((_VECTOR_TOKEN_BYTES - lengths[short]).astype(np.uint8),
                             kind="stable")]
    positions, remaining = starts[order], lengths[order]
    crc = np.full(len(order), 0xFFFFFFFF, np.uint32)
    longer_than = np.bincount(remaining, minlength=_VECTOR_TOKEN_BYTES + 1)[::-1].cumsum()[::-1]
    for step in range(int(remaining[0]) if len(remaining) else 0):
        active = int(longer_than[step + 1])
        head = crc[:active]
        index = (head ^ data[positions[:active] + step]) & np.uint32(0xFF)
        crc[:active] = _CRC_TABLE[index] ^ (head >> np.uint32(8))
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out

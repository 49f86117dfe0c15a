"""Duplicate rows, found in one streaming pass with a few bytes of memory per row, pure.

    normalize_for_dedup(text) -> str
    ExactDuplicates:  add(text) per row, finish() -> {duplicate row: its first occurrence}
    NearDuplicates:   add(text) per row, finish() -> [(duplicate row, earliest row of its
                      cluster, estimated Jaccard similarity of the two)]

Rows are numbered 0, 1, 2, ... in the order they are added. finish() ends the pass: it releases
the stored hashes.

Normalization (both kinds): Unicode NFKC (full-width and compatibility forms fold to plain ones),
casefold, whitespace runs collapsed to one space, ends stripped. Punctuation is kept: "Is it
done?" and "It is done." are different rows; near-duplicate detection ignores punctuation anyway.

ExactDuplicates keeps one 8-byte blake2b digest per row in fixed-size numpy chunks (8 bytes/row,
plus at most one 512 KiB chunk of slack: 5M rows = 40 MB) and finds repeats after the pass with
one sort (finish() holds a second 8 bytes/row briefly). Distinct rows collide with probability
about n^2 / 2^65: 7e-7 for 5M rows, 3e-5 for 30M; a collision would drop one row as a duplicate.

NearDuplicates: MinHash over word bigrams + LSH, tuned for Jaccard similarity >= 0.8 (a word
changed, a typo or a punctuation or casing edit in a row of ~40 words is ~0.9).
- Tokens: runs of letters/digits after normalization; each Chinese/Japanese character is a token
  (those scripts have no spaces). Shingles are pairs of consecutive tokens: one changed word
  changes two of a row's n-1 shingles, so rows built from one template with different content
  stay apart (whereas character 5-grams of the shared template would dominate).
- Rows with fewer than MIN_TOKENS (5) tokens are not near-deduplicated: a handful of words
  carries no evidence of copying beyond "same words" (exact duplicates still catch copies).
- 128 hash functions (multiply-shift over a 32-bit shingle hash), vectorized per batch of rows;
  only the lowest 4 bits of each minimum are kept (b-bit MinHash): 128 x 4 bits = 64 bytes per
  row, plus its 8-byte row number: 72 bytes/row (1M rows = 72 MB).
- LSH: 16 bands of 8 values; a band's key is its 8 nibbles, one uint32. Two rows become a
  candidate pair when any band matches. A value matches with probability p = J + (1 - J)/16
  (4-bit values also match by chance), so a pair is a candidate with probability
  1 - (1 - p^8)^16: 0.69 at J = 0.7, 0.966 at J = 0.8, 0.996 at J = 0.85, ~1 at J >= 0.9.
  Unrelated rows (J ~ 0) share a band with probability 16 * 16^-8 = 4e-9 per pair.
- Verification: the candidate pair's similarity is estimated from all 128 values,
  J = (matches/128 - 1/16) / (15/16) (standard deviation ~0.03 near 0.85), and the pair is kept
  only if J >= threshold, so rows that merely share a bucket are not merged.
- Clusters: verified pairs are joined into connected components (vectorized union by minimum
  label); each member maps to the component's earliest row, and the reported similarity is the
  estimate between the member and that earliest row (below the threshold only for chains of
  edits). In a band, a row is compared with the earliest and the previous row of its bucket,
  which keeps candidate pairs linear in the number of rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .shingles import MIN_TOKENS, NormalizedBatch, normalize_batch, normalize_for_dedup, shingles

__all__ = ["MIN_TOKENS", "ExactDuplicates", "NearDuplicates", "NormalizedBatch",
           "normalize_batch", "normalize_for_dedup"]
NUM_PERMUTATIONS = 128
BANDS = 16
VALUES_PER_BAND = NUM_PERMUTATIONS // BANDS  # 8 values of 4 bits: one uint32 band key
BITS_PER_VALUE = 4
DEFAULT_THRESHOLD = 0.8

_CHUNK_ROWS = 1 << 16
# Rows added one by one are normalized and shingled this many at a time (see shingles.py).
ROWS_PER_BATCH = 256
# Shingles MinHashed at once: their (permutations x shingles) uint64 matrix is 8 MiB, computed in
# place (measured: 1,024-shingle slices that fit a cache were 1.4x slower, numpy's per-call cost)
_SHINGLES_PER_BATCH = 8192
_PAIRS_PER_BATCH = 1 << 16
# multiply-shift constants of the 128 hash functions, and of the shingle hash; fixed so that
# results do not depend on the process
_PERMUTATION_RNG = np.random.default_rng(0x5EED)
_MULTIPLIERS = _PERMUTATION_RNG.integers(1, 2**63, NUM_PERMUTATIONS, dtype=np.uint64) * 2 + 1
_INCREMENTS = _PERMUTATION_RNG.integers(0, 2**63, NUM_PERMUTATIONS, dtype=np.uint64)
_NIBBLE_SHIFTS = np.arange(VALUES_PER_BAND, dtype=np.uint32) * BITS_PER_VALUE


class _ChunkedArray:
    """Append-only numpy storage in fixed-size chunks: growing never copies stored data and the
    slack is at most one chunk (a doubling array can hold twice its data while it grows)."""

    def __init__(self, dtype: type, width: int | None = None) -> None:
        self._dtype = dtype
        self._tail = () if width is None else (width,)
        self._chunks: list[np.ndarray] = []
        self._filled = _CHUNK_ROWS  # the last chunk is full: the next append allocates one
        self.length = 0

    def _room(self) -> np.ndarray:
        if self._filled == _CHUNK_ROWS:
            self._chunks.append(np.empty((_CHUNK_ROWS, *self._tail), dtype=self._dtype))
            self._filled = 0
        return self._chunks[-1]

    def append_value(self, value: int) -> None:
        self._room()[self._filled] = value
        self._filled += 1
        self.length += 1

    def extend(self, values: np.ndarray) -> None:
        offset = 0
        while offset < len(values):
            chunk = self._room()
            count = min(len(values) - offset, _CHUNK_ROWS - self._filled)
            chunk[self._filled:self._filled + count] = values[offset:offset + count]
            self._filled += count
            offset += count
        self.length += len(values)

    @property
    def nbytes(self) -> int:
        return sum(chunk.nbytes for chunk in self._chunks)

    def take_chunks(self) -> list[np.ndarray]:
        """The stored values chunk by chunk; the storage is empty afterwards."""
        chunks = self._chunks
        if chunks:
            chunks[-1] = chunks[-1][:self._filled]
        self._chunks, self._filled, self.length = [], _CHUNK_ROWS, 0
        return chunks

    def take(self) -> np.ndarray:
        """The stored values in one array; each chunk is released once copied, so the peak is
        the data plus one chunk. The storage is empty afterwards."""
        out = np.empty((self.length, *self._tail), dtype=self._dtype)
        chunks = self.take_chunks()
        position = 0
        while chunks:
            chunk = chunks.pop(0)
            out[position:position + len(chunk)] = chunk
            position += len(chunk)
        return out


class ExactDuplicates:
    def __init__(self) -> None:
        self._hashes = _ChunkedArray(np.uint64)
        self._pending: list[str] = []

    @property
    def nbytes(self) -> int:
        """Memory held by the stored hashes (8 bytes per row, allocated a chunk at a time)."""
        return self._hashes.nbytes

    def add(self, text: str) -> None:
        self._pending.append(text)
        if len(self._pending) == ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            texts, self._pending = self._pending, []
            self._hash(normalize_batch(texts))

    def add_batch(self, batch: NormalizedBatch) -> None:
        """The next rows, normalized (after any rows still pending from add())."""
        self._flush()
        self._hash(batch)

    def _hash(self, batch: NormalizedBatch) -> None:
        digests = b"".join(hashlib.blake2b(batch.row(index), digest_size=8).digest()
                           for index in range(len(batch)))
        self._hashes.extend(np.frombuffer(digests, dtype="<u8"))

    def finish(self) -> dict[int, int]:
        """Duplicate row -> the row it first occurred at."""
        duplicates, firsts = self.finish_arrays()
        return dict(zip(duplicates.tolist(), firsts.tolist(), strict=True))

    def finish_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(duplicate rows ascending, the row each first occurred at) as int64 arrays: no
        Python object per duplicate, for files that are mostly duplicates."""
        none = (np.empty(0, np.int64), np.empty(0, np.int64))
        self._flush()
        chunks = self._hashes.take_chunks()
        if not chunks:
            return none
        ordered = np.concatenate(chunks)
        ordered.sort()
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        del ordered
        if not len(repeated):
            return none
        # rows whose hash occurs more than once, found chunk by chunk to bound the temporaries
        member_rows, member_hashes = [], []
        for number, chunk in enumerate(chunks):
            slot = np.minimum(np.searchsorted(repeated, chunk), len(repeated) - 1)
            is_member = repeated[slot] == chunk
            member_rows.append(np.flatnonzero(is_member) + number * _CHUNK_ROWS)
            member_hashes.append(chunk[is_member])
        rows, row_hashes = np.concatenate(member_rows), np.concatenate(member_hashes)
        order = np.argsort(row_hashes, kind="stable")  # equal hashes keep row order
        rows, row_hashes = rows[order], row_hashes[order]
        starts_group = np.empty(len(rows), dtype=bool)
        starts_group[0] = True
        starts_group[1:] = row_hashes[1:] != row_hashes[:-1]
        first = rows[np.maximum.accumulate(np.where(starts_group, np.arange(len(rows)), 0))]
        duplicates, firsts = rows[~starts_group], first[~starts_group]
        order = np.argsort(duplicates, kind="stable")
        return duplicates[order], firsts[order]


class NearDuplicates:
    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._rows_added = 0
        self._signatures = _ChunkedArray(np.uint32, BANDS)  # packed 4-bit MinHash values
        self._row_numbers = _ChunkedArray(np.int64)  # which row each signature belongs to
        self._pending_texts: list[str] = []
        # rows shingled, waiting to be MinHashed: (row numbers, shingle counts, shingles)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_count = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the stored signatures and row numbers (72 bytes per row, allocated a
        chunk at a time), not counting the batch of rows waiting to be hashed."""
        return self._signatures.nbytes + self._row_numbers.nbytes

    def add(self, text: str) -> None:
        self._pending_texts.append(text)
        if len(self._pending_texts) == ROWS_PER_BATCH:
            self._shingle_pending_texts()

    def _shingle_pending_texts(self) -> None:
        if self._pending_texts:
            texts, self._pending_texts = self._pending_texts, []
            self._shingle(normalize_batch(texts))

    def add_batch(self, batch: NormalizedBatch) -> None:
        """The next rows, normalized (after any rows still pending from add())."""
        self._shingle_pending_texts()
        self._shingle(batch)

    def _shingle(self, batch: NormalizedBatch) -> None:
        rows, counts, hashes = shingles(batch)
        self._pending.append((rows + self._rows_added, counts, hashes))
        self._rows_added += len(batch)
        self._pending_count += len(hashes)
        if self._pending_count >= _SHINGLES_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        self._shingle_pending_texts()
        if not self._pending:
            return
        rows, lengths, hashes = (np.concatenate(part) for part in zip(*self._pending, strict=True))
        self._pending.clear()
        self._pending_count = 0
        if not len(rows):
            return
        minimums = _minhash(hashes, lengths)
        nibbles = (minimums & np.uint64(0xF)).astype(np.uint32)
        packed = np.bitwise_or.reduce(
            nibbles.reshape(len(lengths), BANDS, VALUES_PER_BAND) << _NIBBLE_SHIFTS, axis=2
        )
        self._signatures.extend(packed)
        self._row_numbers.extend(rows)

    def finish(self) -> list[tuple[int, int, float]]:
        """(duplicate row, earliest row of its cluster, estimated Jaccard) per duplicate."""
        rows, earliest, similarity = self.finish_arrays()
        return [(row, first, round(jaccard, 4)) for row, first, jaccard in zip(
            rows.tolist(), earliest.tolist(), similarity.tolist(), strict=True)]

    def finish_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """finish() as arrays (rows ascending): no Python object per duplicate."""
        self._flush()
        signatures = self._signatures.take()
        row_numbers = self._row_numbers.take()
        edges = np.empty(0, dtype=np.int64)  # verified pairs (later slot, earlier slot) as keys
        count = len(signatures)
        for band in range(BANDS):
            later, earlier = _bucket_pairs(signatures[:, band])
            keep = _estimated_jaccard(signatures, later, earlier) >= self.threshold
            edges = np.unique(np.concatenate(
                [edges, later[keep].astype(np.int64) * count + earlier[keep]]))
        if not len(edges):
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
        slots, earliest = _earliest_in_component(edges // count, edges % count)
        similarity = _estimated_jaccard(signatures, slots, earliest)
        rows, firsts = row_numbers[slots], row_numbers[earliest]
        order = np.argsort(rows, kind="stable")
        return rows[order], firsts[order], similarity[order].astype(np.float64)


def _minhash(shingles: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row, the minimum of each of the 128 hash functions over the row's shingles.
    `shingles` holds the rows' shingles back to back, `lengths` how many each row has.
    A hash is the high 32 bits of a*x + b (mod 2^64): the minimum of the full 64-bit values has
    the minimal high half, so the shift is applied to the minimums only."""
    row_of_shingle = np.repeat(np.arange(len(lengths)), lengths)
    minimums = np.full((len(lengths), NUM_PERMUTATIONS), np.iinfo(np.uint64).max, np.uint64)
    hashed = np.empty((NUM_PERMUTATIONS, _SHINGLES_PER_BATCH), np.uint64)
    for start in range(0, len(shingles), _SHINGLES_PER_BATCH):
        part = shingles[start:start + _SHINGLES_PER_BATCH]
        # permutations x shingles: reducing along contiguous rows is ~7x faster than down columns
        block = hashed[:, :len(part)]
        np.multiply(_MULTIPLIERS[:, None], part, out=block)
        block += _INCREMENTS[:, None]
        part_rows = row_of_shingle[start:start + _SHINGLES_PER_BATCH]
        # each row's shingles are contiguous: reduce each row's segment of this batch
        segment_starts = np.flatnonzero(np.r_[True, part_rows[1:] != part_rows[:-1]])
        segment_rows = part_rows[segment_starts]
        minimums[segment_rows] = np.minimum(
            minimums[segment_rows], np.minimum.reduceat(block, segment_starts, axis=1).T
        )
    minimums >>= np.uint64(32)
    return minimums


def _bucket_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (slot, earlier slot) sharing a key: each slot with the first and with the previous
    slot of its bucket. Slots as int32 (a scan has at most near_duplicate_max_rows): half the
    memory of the per-band temporaries, the peak of a large file's finish."""
    order = np.argsort(keys, kind="stable").astype(np.int32)
    ordered = keys[order]
    same_as_previous = ordered[1:] == ordered[:-1]
    del ordered
    positions = (np.flatnonzero(same_as_previous) + 1).astype(np.int32)
    if not len(positions):
        return np.empty(0, np.int32), np.empty(0, np.int32)
    bucket_starts = np.flatnonzero(np.r_[True, ~same_as_previous]).astype(np.int32)
    del same_as_previous
    first = bucket_starts[np.searchsorted(bucket_starts, positions, side="right") - 1]
    with_other_previous = positions[positions - 1 != first]
    later = np.concatenate([order[positions], order[with_other_previous]])
    earlier = np.concatenate([order[first], order[with_other_previous - 1]])
    return later, earlier


def _estimated_jaccard(signatures: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard similarity of rows a and b from their 4-bit MinHash values, corrected for the
    1/16 chance that two different minimums agree in 4 bits."""
    estimates = np.empty(len(a), dtype=np.float64)
    for start in range(0, len(a), _PAIRS_PER_BATCH):
        stop = start + _PAIRS_PER_BATCH
        differing = (signatures[a[start:stop]] ^ signatures[b[start:stop]]).view(np.uint8)
        matches = ((differing & 0x0F) == 0).sum(axis=1) + ((differing >> 4) == 0).sum(axis=1)
        chance = 1 / 2**BITS_PER_VALUE
        estimates[start:stop] = (matches / NUM_PERMUTATIONS - chance) / (1 - chance)
    return np.clip(estimates, 0.0, 1.0)


def _earliest_in_component(later: np.ndarray, earlier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every slot joined to an earlier one, the earliest slot of its connected component.
    Union by minimum label, vectorized: hook each edge's larger root to its smaller one, then
    jump pointers until every label is a root."""
    nodes, endpoints = np.unique(np.concatenate([later, earlier]), return_inverse=True)
    u, v = endpoints[:len(later)], endpoints[len(later):]
    label = np.arange(len(nodes))
    while True:
        label_u, label_v = label[u], label[v]
        differ = label_u != label_v
        if not differ.any():
            break
        np.minimum.at(label, np.maximum(label_u, label_v)[differ],
                      np.minimum(label_u, label_v)[differ])
        while not np.array_equal(jumped := label[label], label):
            label = jumped
    joined = label != np.arange(len(nodes))
    return nodes[joined], nodes[label[joined]]

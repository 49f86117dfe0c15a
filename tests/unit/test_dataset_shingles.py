"""The batch (numpy) normalization and shingling give exactly the per-row definitions:
normalize_for_dedup, tokens as runs of letters/digits (CJK characters one by one), zlib.crc32 per
token, multiply-shift of each bigram."""

from __future__ import annotations

import random
import re
import zlib

import numpy as np

from services.dataset.shingles import (
    FIELD_MARK,
    MIN_TOKENS,
    normalize_batch,
    normalize_for_dedup,
    shingles,
)

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[^\W{CJK}]+|[{CJK}]")
PIECES = ["", " ", "a", "  Hello\tWorld \x1c x\n", "Straße ＡＢＣ ﬁle 東京タワー one two three",
          f"a {FIELD_MARK} b", f"x{FIELD_MARK}y z w v u t", "é", "A_B c-d e.f g h i j k",
          FIELD_MARK, "\n\n", "ZZ " * 70 + "q" * 100 + " r s t u", "x\x00y z", "\u00a0nbsp w",
          "Tab\tand\x0bvertical\x0cfeed\rreturn words here", "ÅNGSTRÖM Ⅻ ½ ﬃ words more"]


def rows(count: int = 400, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    words = "the Model learns FROM data while engineers tune adapters 42 x_y".split()
    return [rng.choice(PIECES) + " ".join(rng.choice(words) for _ in range(rng.randrange(12)))
            + rng.choice(PIECES) for _ in range(count)]


def reference_shingles(text: str) -> np.ndarray | None:
    tokens = TOKEN.findall(normalize_for_dedup(text))
    if len(tokens) < MIN_TOKENS:
        return None
    hashes = np.array([zlib.crc32(t.encode()) for t in tokens], dtype=np.uint64)
    bigrams = (hashes[:-1] << np.uint64(32)) | hashes[1:]
    return (bigrams * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)


def test_batch_normalization_equals_the_per_row_definition():
    texts = rows()
    batch = normalize_batch(texts)
    assert [batch.row(i).tobytes().decode() for i in range(len(texts))] == [
        normalize_for_dedup(t) for t in texts]
    assert not batch.plain.all() and batch.plain.any()  # both paths ran


def test_batch_shingles_equal_the_per_row_definition():
    texts = rows()
    eligible, counts, hashes = shingles(normalize_batch(texts))
    got = dict(zip(eligible.tolist(), np.split(hashes, np.cumsum(counts)[:-1]), strict=True))
    for index, text in enumerate(texts):
        expected = reference_shingles(text)
        if expected is None:
            assert index not in got, text
        else:
            assert np.array_equal(got[index], expected), text

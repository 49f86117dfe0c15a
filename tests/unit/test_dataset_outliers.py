"""Length outliers: ordinary variation in a small file does not warn; rows far longer or shorter
than the typical row do, in the ingest report and its warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.dataset import ingest
from services.dataset.outliers import MIN_ROWS, length_fences

# The shape of the file that warned: 26 rows of 45-91 characters, most near the short end.
SMALL_FILE_LENGTHS = np.array([45, 46, 46, 47, 47, 48, 48, 48, 49, 49, 50, 50, 51, 51, 52, 52,
                               53, 54, 55, 56, 84, 86, 87, 89, 90, 91])


def ingested(tmp_path, lengths) -> ingest.Ingested:
    source = tmp_path / "data.jsonl"
    # distinct rows of exactly n characters (no duplicate findings in the way)
    source.write_text("".join(json.dumps({"text": f"{i:04d}" + "x" * (n - 4)}) + "\n"
                              for i, n in enumerate(lengths)))
    work = tmp_path / "work"
    work.mkdir()
    return ingest.ingest(source, ingest.Options(name="ds"), work, ingest.Limits())


def outlier_rows(result: ingest.Ingested) -> list[int]:
    return [f["row"] for f in result.report["findings"] if f["kind"] == "outlier"]


def test_ordinary_variation_in_a_small_file_does_not_warn(tmp_path):
    q1, q3 = np.percentile(SMALL_FILE_LENGTHS, [25, 75])
    assert (SMALL_FILE_LENGTHS > q3 + 3 * (q3 - q1)).sum() == 6  # what Tukey on raw lengths flags
    result = ingested(tmp_path, SMALL_FILE_LENGTHS)
    assert result.report["chars"]["min"] == 45 and result.report["chars"]["max"] == 91
    assert result.report["length_outliers"] == 0 and outlier_rows(result) == []
    assert result.status == "accepted" and result.warnings == []


def test_a_5000_character_row_among_50_character_rows_is_flagged(tmp_path):
    lengths = [48 + i % 5 for i in range(50)]
    lengths.insert(30, 5000)
    result = ingested(tmp_path, lengths)
    assert result.report["length_outliers"] == 1 and outlier_rows(result) == [31]
    [warning] = result.warnings
    assert warning.startswith("1 row(s) are length outliers (shorter than ")


def test_a_near_empty_row_among_long_rows_is_flagged():
    lengths = np.array([500 + 7 * i for i in range(40)] + [3])
    assert length_fences(lengths).outside(lengths).tolist() == [40]


def test_a_uniform_file_has_a_floor_on_its_spread():
    lengths = np.full(100, 60)
    fences = length_fences(lengths)
    # IQR 0: the floor (Q3 = 1.5 Q1) lets rows of 1/3.4 to 3.4 times the typical length pass
    assert fences.low < 60 / 3.3 and fences.high > 60 * 3.3
    assert fences.outside(np.array([20, 59, 61, 190])).tolist() == []
    assert fences.outside(np.array([15, 250])).tolist() == [0, 1]


@pytest.mark.parametrize("rows", [MIN_ROWS - 1, 3])
def test_too_few_rows_give_no_fences(rows):
    assert length_fences(np.array([50] * (rows - 1) + [5000])) is None


def test_lengths_spread_over_orders_of_magnitude_are_not_outliers():
    # a chat set: one-liners to pages, log-normal, 5,000 rows
    lengths = np.exp(np.random.default_rng(0).normal(np.log(400), 1.0, 5000)).round() + 1
    assert lengths.max() / lengths.min() > 1000
    assert length_fences(lengths).outside(lengths).tolist() == []

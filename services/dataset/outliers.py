"""Length outliers: rows far longer or shorter than the file's typical row, by a robust rule.

    length_fences(chars) -> Fences(low, high) in characters, or None when there are too few rows

Tukey's "far out" fences (3 IQR beyond the quartiles) on the log of the character length: row
lengths vary by factors, not by amounts (a chat set runs from one line to pages), and in log
space a fence sits as far below the typical row as above it. The quartiles of a small or
uniform file sit close together, so the spread counts as at least the upper quartile being 1.5x
the lower: ordinary variation never warns. A file of 26 rows of 45-91 characters gets fences of
about 17 and 267 characters; a 5,000-character row among 50-character rows is far outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IQR_FACTOR = 3.0  # Tukey's far out
MIN_LOG_IQR = math.log(1.5)  # the spread floor: Q3 counts as at least 1.5 x Q1
MIN_ROWS = 20  # quartiles of fewer rows say little about what is typical


@dataclass(frozen=True)
class Fences:
    low: float
    high: float

    def outside(self, chars: np.ndarray) -> np.ndarray:
        """Positions of the rows beyond the fences."""
        return np.flatnonzero((chars < self.low) | (chars > self.high))

    def describe(self) -> str:
        return (f"shorter than {self.low:.0f} or longer than {self.high:.0f} characters: "
                f"{IQR_FACTOR:g} IQR beyond the quartiles of log length")


def length_fences(chars: np.ndarray) -> Fences | None:
    if len(chars) < MIN_ROWS:
        return None
    q1, q3 = np.percentile(np.log(np.maximum(chars, 1)), [25, 75])
    reach = IQR_FACTOR * max(q3 - q1, MIN_LOG_IQR)
    return Fences(low=math.exp(q1 - reach), high=math.exp(q3 + reach))

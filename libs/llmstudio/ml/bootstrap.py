"""Paired bootstrap confidence interval of tuned-minus-base for one metric.

Both models were scored on the same samples; each bootstrap replicate draws n sample indices
with replacement (a seeded numpy Generator) and recomputes the metric's corpus score for base
and for tuned on the same indices, so the interval is of the paired difference. The 95%
interval is the 2.5th and 97.5th percentiles of the replicate differences. "Tuned better" only
when the interval excludes 0 on the side that is better for the metric (above for accuracy-like
metrics, below for loss and perplexity). Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Comparison:
    name: str
    base: float
    tuned: float
    diff: float  # tuned - base
    ci_low: float
    ci_high: float
    tuned_better: bool
    higher_is_better: bool
    samples: int

    def as_dict(self) -> dict[str, float | bool | str | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def paired_bootstrap(
    name: str,
    base_rows: np.ndarray,
    tuned_rows: np.ndarray,
    score: Callable[[np.ndarray], float],
    *,
    higher_is_better: bool,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Compare base and tuned per-sample statistics (rows aligned sample by sample)."""
    if len(base_rows) != len(tuned_rows):
        raise ValueError(f"{name}: {len(base_rows)} base samples vs {len(tuned_rows)} tuned")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n = len(base_rows)
    base, tuned = score(base_rows), score(tuned_rows)
    diff = tuned - base
    if n == 0:
        return Comparison(name, base, tuned, diff, math.nan, math.nan, False,
                          higher_is_better, 0)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples, dtype=np.float64)
    for b in range(resamples):
        idx = rng.integers(0, n, size=n)
        diffs[b] = score(tuned_rows[idx]) - score(base_rows[idx])
    alpha = (1.0 - confidence) / 2
    low, high = (float(v) for v in np.nanquantile(diffs, [alpha, 1.0 - alpha]))
    better = low > 0 if higher_is_better else high < 0
    return Comparison(name, base, tuned, diff, low, high, bool(better), higher_is_better, n)


def compare(
    base: dict[str, np.ndarray],
    tuned: dict[str, np.ndarray],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[Comparison]:
    """A paired comparison of every metric both sides measured (per-sample statistics from
    llmstudio.ml.metrics.result_stats), in base's order."""
    from llmstudio.ml.metrics import metric_for

    out = []
    for name, rows in base.items():
        if name in tuned:
            m = metric_for(name)
            out.append(paired_bootstrap(name, rows, tuned[name], m.score,
                                        higher_is_better=m.higher_is_better,
                                        resamples=resamples, seed=seed))
    return out

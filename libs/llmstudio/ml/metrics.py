"""The metric registry: each metric turns a model's outputs into per-sample statistics (one row
per sample) and a score computed from any multiset of those rows, so a paired bootstrap
(llmstudio.ml.bootstrap) can resample samples and recompute the exact corpus-level score.

- eval_loss: mean cross-entropy per learned token (rows: loss sum, token count; the score is
  sum/sum, token-weighted as in training); perplexity = exp(eval_loss). Lower is better.
- exact_match: the generated text, stripped, equals the reference, stripped.
- token_f1: SQuAD-style token F1 (lowercase, punctuation and articles removed).
- bleu, chrf: sacrebleu's corpus BLEU and chrF (0-100), from its sentence-level sufficient
  statistics summed over the samples (what sacrebleu's own paired bootstrap resamples), never
  an average of sentence scores.
- rouge_l: mean ROUGE-L F-measure (rouge-score, Porter stemmer).

Pure: numpy, sacrebleu, rouge-score; no torch, no I/O.
"""

from __future__ import annotations

import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Outputs:
    """What one model produced on one evaluation set: per-row loss over learned tokens, and the
    greedy predictions for the rows with a reference answer."""

    loss_sums: Sequence[float] = ()
    loss_tokens: Sequence[int] = ()
    predictions: Sequence[str] = ()
    references: Sequence[str] = ()


@dataclass(frozen=True)
class Metric:
    name: str
    needs: str  # "loss" or "text": which part of Outputs it scores
    higher_is_better: bool
    stats: Callable[[Outputs], np.ndarray]  # (samples, k) float64
    score: Callable[[np.ndarray], float]  # from any (m, k) rows of those statistics
    description: str = field(default="", compare=False)

    def compute(self, out: Outputs) -> float:
        return self.score(self.stats(out))


# ---- loss -------------------------------------------------------------------------------------

def _loss_stats(out: Outputs) -> np.ndarray:
    if len(out.loss_sums) != len(out.loss_tokens):
        raise ValueError("loss_sums and loss_tokens differ in length")
    return np.column_stack([np.asarray(out.loss_sums, dtype=np.float64),
                            np.asarray(out.loss_tokens, dtype=np.float64)]).reshape(-1, 2)


def _mean_loss(rows: np.ndarray) -> float:
    tokens = rows[:, 1].sum()
    return float(rows[:, 0].sum() / tokens) if tokens else math.nan


def _perplexity(rows: np.ndarray) -> float:
    loss = _mean_loss(rows)
    try:
        return min(math.exp(loss), sys.float_info.max)  # stays valid JSON
    except OverflowError:
        return sys.float_info.max


# ---- text: per-sample means -----------------------------------------------------------------

def _texts(out: Outputs) -> tuple[Sequence[str], Sequence[str]]:
    if len(out.predictions) != len(out.references):
        raise ValueError(f"{len(out.predictions)} predictions for {len(out.references)} "
                         "references")
    return out.predictions, out.references


def _column(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


def _mean(rows: np.ndarray) -> float:
    return float(rows[:, 0].mean()) if len(rows) else math.nan


def exact(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def _exact_stats(out: Outputs) -> np.ndarray:
    return _column([float(exact(p, r)) for p, r in zip(*_texts(out), strict=True)])


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1; when either side normalises to nothing, 1 if both do, else 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _f1_stats(out: Outputs) -> np.ndarray:
    return _column([token_f1(p, r) for p, r in zip(*_texts(out), strict=True)])


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l_stats(out: Outputs) -> np.ndarray:
    scorer = _rouge_scorer()
    # rouge-score's signature is score(target, prediction)
    return _column([scorer.score(r, p)["rougeL"].fmeasure
                    for p, r in zip(*_texts(out), strict=True)])


# ---- text: sacrebleu corpus metrics from sufficient statistics --------------------------------

@cache
def sacrebleu_metric(name: str) -> Any:
    """sacrebleu's BLEU() or CHRF() with its defaults (one shared instance, stateless here)."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU, "chrf": CHRF}[name]()


def _sacrebleu_stats(name: str) -> Callable[[Outputs], np.ndarray]:
    def stats(out: Outputs) -> np.ndarray:
        hyps, refs = _texts(out)
        metric = sacrebleu_metric(name)
        rows = metric._extract_corpus_statistics(list(hyps), [list(refs)])
        width = len(rows[0]) if rows else 0
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), width)
    return stats


def _sacrebleu_score(name: str) -> Callable[[np.ndarray], float]:
    def score(rows: np.ndarray) -> float:
        if not len(rows):
            return math.nan
        metric = sacrebleu_metric(name)
        # integer counts: sums of float64 counts are exact far beyond any corpus size
        totals = [int(round(v)) for v in rows.sum(axis=0)]
        return float(metric._compute_score_from_stats(totals).score)
    return score


# ---- the registry -----------------------------------------------------------------------------

def _metrics(*ms: Metric) -> dict[str, Metric]:
    return {m.name: m for m in ms}


METRICS: dict[str, Metric] = _metrics(
    Metric("eval_loss", "loss", False, _loss_stats, _mean_loss,
           "mean cross-entropy per learned token"),
    Metric("perplexity", "loss", False, _loss_stats, _perplexity, "exp(eval_loss)"),
    Metric("exact_match", "text", True, _exact_stats, _mean,
           "prediction equals reference (stripped)"),
    Metric("token_f1", "text", True, _f1_stats, _mean, "SQuAD token F1"),
    Metric("bleu", "text", True, _sacrebleu_stats("bleu"), _sacrebleu_score("bleu"),
           "sacrebleu corpus BLEU"),
    Metric("chrf", "text", True, _sacrebleu_stats("chrf"), _sacrebleu_score("chrf"),
           "sacrebleu corpus chrF"),
    Metric("rouge_l", "text", True, _rouge_l_stats, _mean, "mean ROUGE-L F-measure"),
)

LOSS_METRICS = ("eval_loss", "perplexity")
# A suite names metrics (task files add their own, see llmstudio.ml.tasks).
SUITES: dict[str, tuple[str, ...]] = {
    "default": ("eval_loss", "perplexity", "exact_match"),
    "generation": ("eval_loss", "perplexity", "exact_match", "token_f1", "bleu", "chrf",
                   "rouge_l"),
    "loss": LOSS_METRICS,
    "tasks": (),  # only the task files given
}


def suite_metrics(suite: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The metric names of `suite` ("" = default) plus `extra` ones, in order, without repeats;
    ValueError naming the unknown suite or metric."""
    name = suite or "default"
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r} (suites: {', '.join(sorted(SUITES))})")
    names = list(SUITES[name])
    for m in extra:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r} (metrics: {', '.join(METRICS)})")
        if m not in names:
            names.append(m)
    return tuple(names)


def sample_stats(names: Sequence[str], out: Outputs) -> dict[str, np.ndarray]:
    """Per-sample statistics of each metric of `names` that `out` can measure: loss metrics need
    loss rows, text metrics at least one prediction (rows without a reference have none)."""
    have = {"loss": bool(len(out.loss_sums)), "text": bool(len(out.predictions))}
    return {n: METRICS[n].stats(out) for n in names if have[METRICS[n].needs]}


def task_metric(name: str) -> Metric:
    """A task file's metric (`<task>/score`, `<task>/acc`, `<task>/acc_norm`): the mean of its
    per-sample 0/1 scores, higher is better."""
    return Metric(name, "task", True, _no_stats, _mean, "task file score")


def _no_stats(out: Outputs) -> np.ndarray:
    raise ValueError("task metrics are scored by llmstudio.ml.evaluation, per task file")


def metric_for(name: str) -> Metric:
    return METRICS.get(name) or task_metric(name)


def result_stats(names: Sequence[str], result: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-sample statistics of an `evaluate_model` result: the metrics of `names` it can
    measure (from its "outputs") and every task metric (its "task_scores")."""
    stats: dict[str, np.ndarray] = {}
    if "outputs" in result:
        stats.update(sample_stats(names, Outputs(**result["outputs"])))
    for name, scores in result.get("task_scores", {}).items():
        stats[name] = _column(list(scores))
    return stats


def scores(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """The corpus score of each metric from its per-sample statistics."""
    return {name: metric_for(name).score(rows) for name, rows in stats.items()}

"""The metric registry against the reference implementations (sacrebleu, rouge-score) on a fixed
corpus, SQuAD-style token F1, suites, and the paired bootstrap: reproducible by seed, different
with another seed, the sign rule for lower-is-better metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmstudio.ml.bootstrap import paired_bootstrap
from llmstudio.ml.metrics import (
    METRICS,
    Outputs,
    normalize_answer,
    sample_stats,
    suite_metrics,
    token_f1,
)

REFERENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "It is raining heavily in the north of the country today.",
    "She sells sea shells by the sea shore.",
    "Paris is the capital of France.",
    "The results were better than expected, said the minister.",
    "I would like a cup of tea, please.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
PREDICTIONS = [
    "The cat sat on a mat.",
    "A fast brown fox jumped over the lazy dog.",
    "Heavy rain falls in the north today.",
    "She sells sea shells on the sea shore.",
    "Paris is the capital city of France.",
    "The minister said results beat expectations.",
    "a cup of tea please",
    "",
]
OUT = Outputs(predictions=PREDICTIONS, references=REFERENCES)


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores():
    assert METRICS["bleu"].compute(OUT) == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert METRICS["chrf"].compute(OUT) == pytest.approx(
        sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    # corpus BLEU is not the mean of sentence BLEU: the statistics are summed, not averaged
    sentence_mean = np.mean([sacrebleu.sentence_bleu(p, [r]).score
                             for p, r in zip(PREDICTIONS, REFERENCES, strict=True)])
    assert abs(METRICS["bleu"].compute(OUT) - sentence_mean) > 1.0


def test_bleu_of_a_subset_of_rows_equals_sacrebleu_on_that_subset():
    """What the bootstrap does: score a multiset of samples from their statistics."""
    rows = METRICS["bleu"].stats(OUT)
    idx = np.array([0, 0, 3, 5, 5, 5, 6])
    expected = sacrebleu.corpus_bleu([PREDICTIONS[i] for i in idx],
                                     [[REFERENCES[i] for i in idx]]).score
    assert METRICS["bleu"].score(rows[idx]) == pytest.approx(expected, abs=1e-9)
    crows = METRICS["chrf"].stats(OUT)
    expected = sacrebleu.corpus_chrf([PREDICTIONS[i] for i in idx],
                                     [[REFERENCES[i] for i in idx]]).score
    assert METRICS["chrf"].score(crows[idx]) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_equals_rouge_score_mean_f_measure():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(r, p)["rougeL"].fmeasure
                        for p, r in zip(PREDICTIONS, REFERENCES, strict=True)])
    assert METRICS["rouge_l"].compute(OUT) == pytest.approx(expected, abs=1e-9)
    assert 0.0 < expected < 1.0


def test_exact_match_and_squad_token_f1():
    out = Outputs(predictions=[" yes ", "The Cat!", "a b c", ""],
                  references=["yes", "cat", "b c d", ""])
    assert METRICS["exact_match"].compute(out) == pytest.approx(2 / 4)
    assert normalize_answer("The  Cat, an Apple!") == "cat apple"
    assert token_f1("The Cat!", "cat") == 1.0
    assert token_f1("a b c", "b c d") == pytest.approx(0.8)  # "a" is an article: p=1, r=2/3
    assert token_f1("x y", "b c d") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0
    assert METRICS["token_f1"].compute(out) == pytest.approx((1 + 1 + 0.8 + 1) / 4)


def test_loss_is_token_weighted_and_perplexity_is_its_exp():
    out = Outputs(loss_sums=[2.0, 9.0], loss_tokens=[1, 3])
    assert METRICS["eval_loss"].compute(out) == pytest.approx(11 / 4)
    assert METRICS["perplexity"].compute(out) == pytest.approx(math.exp(11 / 4))
    assert not METRICS["eval_loss"].higher_is_better


def test_suites_and_what_outputs_can_measure():
    assert suite_metrics("") == ("eval_loss", "perplexity", "exact_match")
    assert suite_metrics("loss", ["bleu", "eval_loss"]) == ("eval_loss", "perplexity", "bleu")
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suite_metrics("nope")
    with pytest.raises(ValueError, match="unknown metric 'bleurt'"):
        suite_metrics("default", ["bleurt"])
    # text rows only: no loss measured, so no loss metric
    assert set(sample_stats(suite_metrics("generation"), OUT)) == {
        "exact_match", "token_f1", "bleu", "chrf", "rouge_l"}


def _bleu_pair():
    better = [r if i % 2 else p for i, (p, r) in enumerate(zip(PREDICTIONS, REFERENCES,
                                                                 strict=True))]
    base = METRICS["bleu"].stats(OUT)
    tuned = METRICS["bleu"].stats(Outputs(predictions=better, references=REFERENCES))
    return base, tuned


def test_paired_bootstrap_is_reproducible_by_seed_and_changes_with_it():
    base, tuned = _bleu_pair()
    m = METRICS["bleu"]
    a = paired_bootstrap("bleu", base, tuned, m.score, higher_is_better=True, seed=7)
    b = paired_bootstrap("bleu", base, tuned, m.score, higher_is_better=True, seed=7)
    c = paired_bootstrap("bleu", base, tuned, m.score, higher_is_better=True, seed=8)
    assert a == b
    assert (c.ci_low, c.ci_high) != (a.ci_low, a.ci_high)
    assert a.diff == pytest.approx(a.tuned - a.base) and a.ci_low <= a.ci_high
    assert a.base == pytest.approx(m.compute(OUT), abs=1e-12) and a.samples == len(REFERENCES)


def test_the_paired_resamples_use_the_same_indices_for_both_models():
    """Identical per-sample scores: every replicate's difference is exactly 0, so the interval
    is [0, 0] and tuned is not better (an unpaired bootstrap would give a wide interval)."""
    rows = METRICS["bleu"].stats(OUT)
    cmp = paired_bootstrap("bleu", rows, rows.copy(), METRICS["bleu"].score,
                           higher_is_better=True)
    assert (cmp.ci_low, cmp.ci_high, cmp.tuned_better) == (0.0, 0.0, False)


def test_tuned_better_only_when_the_interval_excludes_zero_on_the_right_side():
    n = 200
    rng = np.random.default_rng(1)
    base = np.column_stack([rng.uniform(2.0, 3.0, n), np.ones(n)])  # loss rows: sum, tokens
    lower = base.copy()
    lower[:, 0] -= 0.5
    loss = METRICS["eval_loss"]
    better = paired_bootstrap("eval_loss", base, lower, loss.score, higher_is_better=False)
    assert better.ci_high < 0 and better.tuned_better
    worse = paired_bootstrap("eval_loss", lower, base, loss.score, higher_is_better=False)
    assert worse.ci_low > 0 and not worse.tuned_better
    # accuracy: a tiny gain on few samples has an interval containing 0
    b = np.zeros((10, 1))
    t = b.copy()
    t[0] = 1.0
    small = paired_bootstrap("exact_match", b, t, METRICS["exact_match"].score,
                             higher_is_better=True)
    assert small.diff == pytest.approx(0.1) and small.ci_low <= 0 and not small.tuned_better

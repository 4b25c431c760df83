"""The score stage: ROUGE per example, means with bootstrap intervals, per category.

ROUGE-1, -2, -L and -Lsum F-measures per example come from Google's
rouge-score with stemming, as `evaluate`'s ROUGE computes them. A mean's 95%
interval is a seeded percentile bootstrap over the test examples; a run's
difference to the base model is a paired bootstrap (the same resampled
examples for both), so the interval reflects only how the two differ.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lorastudy.io import atomic_open, read_jsonl, write_json

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> pd.DataFrame:
    """One row per example, one column per ROUGE type (F-measure, stemmed).

    Google's rouge-score, called as `evaluate`'s ROUGE module calls it
    (`RougeScorer(rouge_types, use_stemmer=True)`, F-measure per example);
    the module (metrics/rouge) gives the same numbers, and a test holds the
    two together. Calling the scorer directly keeps the score job free of
    `evaluate`'s imports (`datasets`, pyarrow), which cost more than the scoring.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(rouge_types=list(ROUGE_TYPES), use_stemmer=True, tokenizer=_stemming_tokenizer())
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    return pd.DataFrame({key: [score[key].fmeasure for score in scores] for key in ROUGE_TYPES})


@functools.cache
def _stemming_tokenizer():
    """rouge-score's own tokenizer and Porter stemmer (what `use_stemmer=True` builds), each word stemmed once.

    Stemming was 60% of scoring 500 answers here (8.5 of 14.4 s): the same
    words stemmed again in every answer and reference, and again for
    ROUGE-Lsum. A word's stem never changes, so the tokens are the same.
    """
    from nltk.stem import porter
    from rouge_score import tokenize, tokenizers

    class StemmedOnce(tokenizers.Tokenizer):
        def __init__(self):
            self.stem = functools.cache(porter.PorterStemmer().stem)

        def tokenize(self, text):
            return tokenize.tokenize(text, self)  # calls self.stem on each word longer than 3 characters

    return StemmedOnce()


def answer_scores(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per example: the ROUGE of its answer, or the mean over its answers when several seeds answered it."""
    answers = [r.get("predictions", [r["prediction"]]) for r in rows]
    if len({len(a) for a in answers}) != 1:
        raise ValueError("the rows were answered by different numbers of generation seeds")
    references = [r["reference"] for r in rows]
    per_seed = [rouge_per_example([a[k] for a in answers], references) for k in range(len(answers[0]))]
    return sum(per_seed) / len(per_seed)


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n] resampled example indices; the same seed gives the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_counts(n: int, samples: int, seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """`bootstrap_indices(n, samples, seed)` as [samples, n] counts (how often each example is drawn in each
    resample), and a generator of `seed` that has drawn them: what it draws next follows the resamples.

    Every resample's mean is then one matrix product, `counts @ values / n`, where indexing copies
    samples x n values: the summary of the Gemma 2B half takes over 700 intervals over the same resamples.
    """
    counts, state = _counts(n, samples, seed)
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return counts, rng


@functools.lru_cache(maxsize=8)
def _counts(n: int, samples: int, seed: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(samples, n))
    counts = np.bincount((np.arange(samples)[:, None] * n + indices).ravel(), minlength=samples * n)
    counts = counts.reshape(samples, n).astype(float)
    counts.setflags(write=False)  # shared by every caller of the cache
    return counts, rng.bit_generator.state


def mean_interval(values: np.ndarray, counts: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean and percentile-bootstrap interval of `values` over resamples given as `bootstrap_counts`."""
    values = np.asarray(values, dtype=float)
    low, high = percentile_interval(counts @ values / len(values), confidence)
    return {"mean": float(values.mean()), "low": low, "high": high}


def percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` share of bootstrap resample means."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def score_generations(
    generations_path: str | os.PathLike,
    per_example_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    by_category_path: str | os.PathLike,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Score one run's generations; write per-example, summary and per-category files."""
    rows = read_jsonl(generations_path)
    if not rows:
        raise ValueError(f"{generations_path}: no generations to score")
    frame = pd.DataFrame({"id": [r["id"] for r in rows], "category": [r["category"] for r in rows]})
    scores = answer_scores(rows)
    frame = pd.concat([frame, scores], axis=1)
    counts, _ = bootstrap_counts(len(frame), bootstrap_samples, seed)
    summary = {
        "examples": len(frame),
        "bootstrap_samples": bootstrap_samples,
        "confidence": confidence,
        **{key: mean_interval(frame[key].to_numpy(), counts, confidence) for key in ROUGE_TYPES},
    }
    by_category = frame.groupby("category")[list(ROUGE_TYPES)].mean().assign(examples=frame.groupby("category").size())
    with atomic_open(per_example_path) as f:
        frame.to_csv(f, index=False, float_format="%.6f")
    with atomic_open(by_category_path) as f:
        by_category.reset_index().to_csv(f, index=False, float_format="%.6f")
    write_json(summary_path, summary)
    log.info("%s: %s", generations_path, {k: round(summary[k]["mean"], 4) for k in ROUGE_TYPES})
    return summary


def score_all(
    generations_paths: Sequence[str | os.PathLike],
    per_example_paths: Sequence[str | os.PathLike],
    summary_paths: Sequence[str | os.PathLike],
    by_category_paths: Sequence[str | os.PathLike],
    processes: int = 1,
    **settings: Any,
) -> list[dict[str, Any]]:
    """`score_generations` for each run's answers, `processes` of them side by side; each run's summary.

    One job scores a model's every run: one process per answer file started
    Python, pandas and rouge-score each time (82 score jobs of the Gemma 2B
    half: 38 s of an idle GPU at the end of the study).
    """
    from lorastudy.forked import forked_map

    jobs = list(zip(generations_paths, per_example_paths, summary_paths, by_category_paths, strict=True))
    return forked_map(score_generations, jobs, processes, **settings)


def paired_difference(
    run: pd.DataFrame, base: pd.DataFrame, key: str, samples: int, seed: int, confidence: float = 0.95
) -> dict[str, float]:
    """Mean of run − base over the same examples, with a paired-bootstrap interval."""
    return paired_differences(run, base, [key], samples, seed, confidence)[key]


def paired_differences(
    run: pd.DataFrame, base: pd.DataFrame, keys: Sequence[str], samples: int, seed: int, confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """`paired_difference` of each of `keys`, the examples matched once."""
    merged = run[["id", *keys]].merge(base[["id", *keys]], on="id", suffixes=("", "_base"), validate="one_to_one")
    if len(merged) != len(run) or len(merged) != len(base):
        raise ValueError("a run and its base model were scored on different test examples")
    counts, _ = bootstrap_counts(len(merged), samples, seed)
    return {key: mean_interval((merged[key] - merged[f"{key}_base"]).to_numpy(), counts, confidence) for key in keys}

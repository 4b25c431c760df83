"""Training-seed replicates: each grid cell over its seeds, and which comparisons hold.

A grid cell (model, subset, rank, epochs) is trained once per seed of
`grid.seeds`. Its interval must cover both sources of variation: which
seed trained it and which test examples scored it. The two-level bootstrap
resamples the seeds with replacement, then the test examples (the same
examples for every seed drawn, as every run answered the same test split),
and takes the mean of that resample. With one seed it is the plain bootstrap
over test examples.

Comparisons pair cells that differ in one grid axis (rank against rank,
epochs against epochs, subset against subset) or a cell against its model's
base. The difference of two cells is bootstrapped the same way, seeds of each
cell resampled on their own and test examples shared (paired); its two-sided
p-value is the bootstrap's, and Holm's step-down correction holds the
family-wise error over every comparison of the study.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

from lorastudy import paths
from lorastudy.scoring import ROUGE_TYPES, bootstrap_counts, percentile_interval

CELL = ("model", "subset", "rank", "epoch")
AXES = {"rank": ("subset", "epoch"), "epoch": ("subset", "rank"), "subset": ("rank", "epoch")}


def cell_name(subset: str, rank: int, epoch: int) -> str:
    return paths.CELL.format(subset=subset, rank=int(rank), epoch=int(epoch))


def cell_of_run(run: str) -> str:
    """`1k_r4_s0_epoch2` -> `1k_r4_epoch2`; `base` stays."""
    return re.sub(r"_s\d+_epoch", "_epoch", run)


def by_cell(by_category: pd.DataFrame) -> pd.DataFrame:
    """Per-category scores of every run, averaged over each cell's seeds."""
    cells = by_category.assign(run=by_category["run"].map(cell_of_run))
    return cells.groupby(["model", "run", "category"], sort=False).mean(numeric_only=True).reset_index()


def resampled_means(matrix: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[samples] means of a seeds × examples matrix, seeds and then examples resampled.

    `counts` are the resampled examples (`scoring.bootstrap_counts`, shared by
    every cell); `rng` draws the seeds.
    """
    seeds, n = matrix.shape
    samples = len(counts)
    per_seed = matrix @ counts.T / n  # [seeds, samples]
    drawn = rng.integers(0, seeds, size=(samples, seeds))
    return per_seed[drawn, np.arange(samples)[:, None]].mean(axis=1)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def _matrices(summary: pd.DataFrame, per_example: Mapping[tuple[str, str], pd.DataFrame], key: str) -> dict[tuple, np.ndarray]:
    """Per cell (and per model's base), the seeds × examples matrix of `key`, examples in id order."""
    out: dict[tuple, list[np.ndarray]] = {}
    for _, row in summary.iterrows():
        scores = per_example[(row["model"], row["run"])].sort_values("id")[key].to_numpy()
        out.setdefault(_cell_key(row), []).append(scores)
    lengths = {len(s) for rows in out.values() for s in rows}
    if len(lengths) != 1:
        raise ValueError(f"runs were scored on test splits of different sizes: {sorted(lengths)}")
    return {cell: np.stack(rows) for cell, rows in out.items()}


def _cell_key(row) -> tuple:
    if row["run"] == paths.BASE:
        return (row["model"], paths.BASE)
    return (row["model"], row["subset"], int(row["rank"]), int(row["epoch"]))


def cell_summary(
    summary: pd.DataFrame, per_example: Mapping[tuple[str, str], pd.DataFrame],
    samples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> pd.DataFrame:
    """One row per grid cell (and per base): means over seeds and examples, seed SD, two-level intervals."""
    matrices = {key: _matrices(summary, per_example, key) for key in ROUGE_TYPES}
    numeric = [c for c in ("training_records", "trainable_parameters", "train_seconds", "steady_train_seconds",
                           "tokens_per_second", "steady_tokens_per_second") if c in summary]
    groups: dict[tuple, list[int]] = {}
    for i, (_, row) in enumerate(summary.iterrows()):
        groups.setdefault(_cell_key(row), []).append(i)
    rows = []
    for cell, positions in groups.items():
        runs = summary.iloc[positions]
        first = runs.iloc[0]
        row = {"model": first["model"], "run": paths.BASE if cell[1] == paths.BASE else cell_name(*cell[1:]),
               "subset": first["subset"], "rank": first["rank"], "epoch": first["epoch"],
               "seeds": len(runs), **runs[numeric].mean().to_dict()}
        for key in ROUGE_TYPES:
            m = matrices[key][cell]
            low, high = percentile_interval(resampled_means(m, *bootstrap_counts(m.shape[1], samples, seed)), confidence)
            per_seed = m.mean(axis=1)
            row |= {f"{key}_mean": float(m.mean()), f"{key}_low": low, f"{key}_high": high,
                    f"{key}_seed_sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")}
            if cell[1] != paths.BASE:
                base = matrices[key][(first["model"], paths.BASE)]
                diff = m - base.mean(axis=0)
                low, high = percentile_interval(resampled_means(diff, *bootstrap_counts(diff.shape[1], samples, seed)), confidence)
                row |= {f"{key}_diff": float(diff.mean()), f"{key}_diff_low": low, f"{key}_diff_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


def _pairs(cells: list[tuple]) -> list[tuple[str, tuple, tuple]]:
    """(axis, a, b) for every two cells of a model that differ in one axis; every cell against its base."""
    pairs = []
    tuned = [c for c in cells if c[1] != paths.BASE]
    index = dict(zip(CELL, range(4)))
    for axis, fixed in AXES.items():
        for a, b in itertools.combinations(tuned, 2):
            if a[0] == b[0] and a[index[axis]] != b[index[axis]] and all(a[index[f]] == b[index[f]] for f in fixed):
                pairs.append((axis, a, b))
    pairs += [("base", c, (c[0], paths.BASE)) for c in tuned]
    return pairs


def comparisons(
    summary: pd.DataFrame, per_example: Mapping[tuple[str, str], pd.DataFrame], key: str = "rougeL",
    samples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> pd.DataFrame:
    """Every one-axis comparison and every cell against base: difference, interval, p, Holm's p, whether it holds."""
    matrices = _matrices(summary, per_example, key)
    rows = []
    n = next(iter(matrices.values())).shape[1]
    for axis, a, b in _pairs(list(matrices)):
        counts, rng = bootstrap_counts(n, samples, seed)  # the same examples for both cells
        diffs = resampled_means(matrices[a], counts, rng) - resampled_means(matrices[b], counts, rng)
        low, high = percentile_interval(diffs, confidence)
        tail = min((diffs <= 0).sum(), (diffs >= 0).sum())
        rows.append({"model": a[0], "compares": axis, "a": _label(a), "b": _label(b),
                     "difference": float(matrices[a].mean() - matrices[b].mean()), "low": low, "high": high,
                     "p": min(1.0, 2 * (tail + 1) / (samples + 1))})
    table = pd.DataFrame(rows, columns=["model", "compares", "a", "b", "difference", "low", "high", "p"])
    table["p_holm"] = holm(table["p"].to_numpy()) if len(table) else []
    table["holds"] = table["p_holm"] < 1 - confidence
    return table


def _label(cell: tuple) -> str:
    return paths.BASE if cell[1] == paths.BASE else cell_name(*cell[1:])

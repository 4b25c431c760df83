"""Seed replicates: two-level bootstrap, per-cell summary, comparisons with Holm's correction."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from lorastudy import paths, replicates
from lorastudy.scoring import ROUGE_TYPES, bootstrap_counts, bootstrap_indices, percentile_interval


def test_holm_matches_the_step_down_procedure():
    adjusted = replicates.holm(np.array([0.01, 0.04, 0.03, 0.005]))
    # Sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, max(0.04*1, 0.06)=0.06.
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert replicates.holm(np.array([0.5, 0.9])) == pytest.approx([1.0, 1.0])


def test_with_one_seed_the_two_level_bootstrap_is_the_plain_one():
    values = np.random.default_rng(1).random(50)
    means = replicates.resampled_means(values[None, :], *bootstrap_counts(50, 200, 7))
    assert means == pytest.approx(values[bootstrap_indices(50, 200, 7)].mean(axis=1))


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(0)
    examples = rng.random(400)
    same = np.stack([examples] * 3)
    spread = np.stack([examples + offset for offset in (-0.05, 0.0, 0.05)])
    width = lambda m: np.subtract(*percentile_interval(replicates.resampled_means(m, *bootstrap_counts(m.shape[1], 2000, 3)), 0.95)[::-1])  # noqa: E731
    assert width(spread) > 1.5 * width(same)


def _grid(effects: dict[int, float], seeds=(0, 1, 2), n=300, noise=0.02):
    """A summary and per-example scores: rank r adds effects[r] over base; each seed adds its own noise."""
    rng = np.random.default_rng(42)
    base = rng.random(n) * 0.5
    rows, per_example = [{"model": "m", "run": paths.BASE, "subset": None, "rank": None, "seed": None, "epoch": None}], {}
    per_example[("m", paths.BASE)] = pd.DataFrame({"id": np.arange(n), **{k: base for k in ROUGE_TYPES}})
    for rank, epoch, seed in itertools.product(effects, (1, 2), seeds):
        run = paths.run_name("1k", rank, seed, epoch)
        scores = base + effects[rank] + rng.normal(0, noise) + rng.normal(0, 0.01, n)
        rows.append({"model": "m", "run": run, "subset": "1k", "rank": rank, "seed": seed, "epoch": epoch,
                     "training_records": 1000, "train_seconds": 10.0 * epoch})
        # Shuffled rows: the scores must be matched by id, not by position.
        frame = pd.DataFrame({"id": np.arange(n), **{k: scores for k in ROUGE_TYPES}}).sample(frac=1, random_state=seed)
        per_example[("m", run)] = frame
    return pd.DataFrame(rows), per_example


def test_cell_summary_gives_mean_seed_sd_and_an_interval_per_cell():
    summary, per_example = _grid({4: 0.1, 8: 0.1})
    cells = replicates.cell_summary(summary, per_example, samples=500)
    assert list(cells["run"]) == ["base", "1k_r4_epoch1", "1k_r4_epoch2", "1k_r8_epoch1", "1k_r8_epoch2"]
    cell = cells.set_index("run").loc["1k_r4_epoch1"]
    runs = summary[(summary["rank"] == 4) & (summary["epoch"] == 1)]
    per_seed = [per_example[("m", r)]["rougeL"].mean() for r in runs["run"]]
    assert cell["seeds"] == 3
    assert cell["rougeL_mean"] == pytest.approx(np.mean(per_seed))
    assert cell["rougeL_seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert cell["rougeL_low"] < cell["rougeL_mean"] < cell["rougeL_high"]
    assert cell["rougeL_diff_low"] > 0.05 and cell["train_seconds"] == 10.0
    assert np.isnan(cells.set_index("run").loc["base", "rougeL_seed_sd"])


def test_comparisons_find_a_planted_rank_effect_and_not_an_absent_one():
    summary, per_example = _grid({2: 0.0, 4: 0.0, 8: 0.08})
    compared = replicates.comparisons(summary, per_example, samples=1000)
    # Per epoch: 3 rank pairs; per rank: 1 epoch pair; every cell against base.
    assert compared["compares"].value_counts().to_dict() == {"rank": 6, "epoch": 3, "base": 6}
    by_pair = compared.set_index(["a", "b"])
    assert by_pair.loc[("1k_r4_epoch1", "1k_r8_epoch1"), "holds"]
    assert by_pair.loc[("1k_r4_epoch1", "1k_r8_epoch1"), "difference"] == pytest.approx(-0.08, abs=0.03)
    assert not by_pair.loc[("1k_r2_epoch1", "1k_r4_epoch1"), "holds"]
    assert (compared["p_holm"] >= compared["p"]).all()
    assert (compared["holds"] == (compared["p_holm"] < 0.05)).all()


def test_cells_of_runs_and_category_means_over_seeds():
    assert replicates.cell_of_run("1k_r4_s12_epoch2") == "1k_r4_epoch2"
    assert replicates.cell_of_run(paths.BASE) == paths.BASE
    by_category = pd.DataFrame({"model": "m", "run": ["1k_r4_s0_epoch1", "1k_r4_s1_epoch1", "base"],
                                "category": "qa", "rougeL": [0.2, 0.4, 0.1], "examples": 5})
    cells = replicates.by_cell(by_category)
    assert cells.set_index("run")["rougeL"].to_dict() == pytest.approx({"1k_r4_epoch1": 0.3, "base": 0.1})

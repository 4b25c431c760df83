"""The summary stage: one table of every run of the grid, and of each base model.

For each run: its place in the grid, what training cost (trainable
parameters, seconds to reach its epoch and tokens per second, each with and
without compilation), the four ROUGE
means with their intervals, and the paired-bootstrap difference to its
model's base, with its interval.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from lorastudy import paths
from lorastudy.io import atomic_open
from lorastudy.replicates import cell_summary, comparisons
from lorastudy.scoring import ROUGE_TYPES, paired_differences

log = logging.getLogger(__name__)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rouge_columns(summary: dict[str, Any]) -> dict[str, float]:
    return {f"{key}_{stat}": summary[key][stat] for key in ROUGE_TYPES for stat in ("mean", "low", "high")}


def _training(run: dict[str, Any]) -> dict[str, Any]:
    where, epoch = paths.job_of(run), run["epoch"]
    stats = _read_json(paths.TRAIN_STATS.format(**where))
    history = pd.read_csv(paths.HISTORY.format(**where))
    at_epoch = history[(history["kind"] == "epoch") & (history["epoch"] == epoch)]
    return {
        "training_records": stats["training_records"],
        "trainable_parameters": stats["trainable_parameters"],
        "train_seconds": float(at_epoch["train_seconds"].iloc[0]),
        "steady_train_seconds": float(at_epoch["steady_train_seconds"].iloc[0]),
        "tokens_per_second": stats["tokens_per_second"],
        "steady_tokens_per_second": stats["steady_tokens_per_second"],
    }


def summarize(
    runs: Sequence[dict[str, Any]],
    summary_path: str | os.PathLike,
    by_category_path: str | os.PathLike,
    cells_path: str | os.PathLike,
    comparisons_path: str | os.PathLike,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Write the summary of every run, per category, per grid cell over seeds, and the comparisons.

    Each run is {"model", "run", and for fine-tuned runs "subset", "rank",
    "seed", "epoch"}; every model's base run must be among them.
    """
    rows, categories, per_example = [], [], {}
    for r in runs:
        files = {k: v.format(model=r["model"]) for k, v in paths.scores(r["run"]).items()}
        per_example[(r["model"], r["run"])] = pd.read_csv(files["per_example"])
        row = {"model": r["model"], "run": r["run"], "subset": r.get("subset"), "rank": r.get("rank"),
               "seed": r.get("seed"), "epoch": r.get("epoch")}
        if r["run"] != paths.BASE:
            row.update(_training(r))
        row.update(_rouge_columns(_read_json(files["summary"])))
        rows.append(row)
        categories.append(pd.read_csv(files["by_category"]).assign(model=r["model"], run=r["run"]))

    for row in rows:
        base = per_example.get((row["model"], paths.BASE))
        if base is None:
            raise ValueError(f"no base run for model {row['model']}: every model's base must be scored")
        if row["run"] == paths.BASE:
            continue
        diffs = paired_differences(per_example[(row["model"], row["run"])], base, ROUGE_TYPES, bootstrap_samples, seed, confidence)
        for key, diff in diffs.items():
            row.update({f"{key}_diff": diff["mean"], f"{key}_diff_low": diff["low"], f"{key}_diff_high": diff["high"]})

    table = pd.DataFrame(rows)
    table["examples"] = [len(per_example[(r["model"], r["run"])]) for r in rows]
    with atomic_open(summary_path) as f:
        table.to_csv(f, index=False, float_format="%.6g")
    by_category = pd.concat(categories)[["model", "run", "category", *ROUGE_TYPES, "examples"]]
    with atomic_open(by_category_path) as f:
        by_category.to_csv(f, index=False, float_format="%.6f")
    bootstrap = {"samples": bootstrap_samples, "confidence": confidence, "seed": seed}
    cells = cell_summary(table, per_example, **bootstrap)
    with atomic_open(cells_path) as f:
        cells.to_csv(f, index=False, float_format="%.6g")
    compared = comparisons(table, per_example, **bootstrap)
    with atomic_open(comparisons_path) as f:
        compared.to_csv(f, index=False, float_format="%.6g")
    log.info("summary of %d runs in %d cells written to %s; %d of %d comparisons hold after Holm's correction",
             len(table), len(cells), summary_path, int(compared["holds"].sum()), len(compared))
    return table


def read_summary(path: str | os.PathLike) -> pd.DataFrame:
    """A summary table (per run or per cell), with the columns that name things read as text ("1k", "250")."""
    return pd.read_csv(path, dtype={"subset": str, "run": str, "model": str})


def best_runs(summary: pd.DataFrame, key: str = "rougeL_mean") -> pd.DataFrame:
    """The fine-tuned run with the highest mean `key`, per model."""
    tuned = summary[summary["run"] != paths.BASE]
    return tuned.loc[tuned.groupby("model")[key].idxmax()].reset_index(drop=True)

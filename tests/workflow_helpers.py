"""Run the real workflow with Snakemake in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
# Set in the environment of workflow runs whose every output is then grepped for them.
FAKE_SECRETS = {"KAGGLE_USERNAME": "fake-user-7f3a", "KAGGLE_KEY": "fake-key-9c1e5b2d7a", "HF_TOKEN": "hf_fakeTokenXq81"}


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=workdir
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# What a run computes; the same bytes however and wherever it ran (same
# machine type, CPU). The summary is compared without its wall-clock columns.
RESULT_FILES = ("results/data/**/*.jsonl", "results/data/*.csv", "results/finetune/**/*.lora.h5",
                "results/generate/**/*.jsonl", "results/score/**/*.csv", "results/rouge_by_category.csv")
CLOCK_COLUMNS = ["train_seconds", "steady_train_seconds", "tokens_per_second", "steady_tokens_per_second"]


def assert_same_results(first: Path, second: Path) -> int:
    """Every result file of run `first` is in run `second` with the same bytes; return how many."""
    import pandas as pd

    compared = 0
    for pattern in RESULT_FILES:
        for a in sorted(first.glob(pattern)):
            b = second / a.relative_to(first)
            assert b.is_file() and b.read_bytes() == a.read_bytes(), f"{a.relative_to(first)} differs between runs"
            compared += 1
    summaries = [pd.read_csv(root / "results" / "summary.csv").drop(columns=CLOCK_COLUMNS) for root in (first, second)]
    pd.testing.assert_frame_equal(*summaries, check_exact=True)
    return compared

"""Every path the workflow reads or writes, built in this one place.

Patterns use Snakemake's `{wildcard}` syntax; the rules import them, and the
package fills them with `str.format` where it needs a concrete file.
"""

from __future__ import annotations

RAW_DOLLY = "results/data/raw/databricks-dolly-15k.jsonl"
FILTERED = "results/data/filtered.jsonl"
TEST = "results/data/test.jsonl"
VAL = "results/data/val.jsonl"
TRAIN = "results/data/train_{subset}.jsonl"
SPLIT_COUNTS = "results/data/split_counts.csv"


def log(stage: str, name: str) -> str:
    """`logs/<stage>/<name>.log`, the catalog's layout for job logs."""
    return f"logs/{stage}/{name}.log"


def benchmark(stage: str, name: str) -> str:
    """Snakemake's per-job resource measurements (wall time, peak RSS)."""
    return f"benchmarks/{stage}/{name}.tsv"

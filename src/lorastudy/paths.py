"""Every path the workflow reads or writes, built in this one place.

Patterns use Snakemake's `{wildcard}` syntax; the rules import them, and the
package fills them with `str.format` where it needs a concrete file. A run is
one fine-tuned adapter, named `{subset}_r{rank}_epoch{epoch}`; the model
without an adapter is the run `base`.
"""

from __future__ import annotations

RAW_DOLLY = "results/data/raw/databricks-dolly-15k.jsonl"
FILTERED = "results/data/filtered.jsonl"
TEST = "results/data/test.jsonl"
VAL = "results/data/val.jsonl"
TRAIN = "results/data/train_{subset}.jsonl"
SPLIT_COUNTS = "results/data/split_counts.csv"

PRESET = "results/models/{model}/preset"

FINETUNE_DIR = "results/finetune/{model}/{subset}_r{rank}"
ADAPTER = FINETUNE_DIR + "/adapter_epoch{epoch}.lora.h5"
HISTORY = FINETUNE_DIR + "/history.csv"
TRAIN_STATS = FINETUNE_DIR + "/train.json"

BASE = "base"
RUN = "{subset}_r{rank}_epoch{epoch}"


def run_name(subset: str, rank: int, epoch: int) -> str:
    return RUN.format(subset=subset, rank=rank, epoch=epoch)


def generations(run: str = "{run}") -> str:
    return f"results/generate/{{model}}/{run}/generations.jsonl"


def generation_stats(run: str = "{run}") -> str:
    return f"results/generate/{{model}}/{run}/generate.json"


def log(stage: str, name: str) -> str:
    """`logs/<stage>/<name>.log`, the catalog's layout for job logs."""
    return f"logs/{stage}/{name}.log"


def benchmark(stage: str, name: str) -> str:
    """Snakemake's per-job resource measurements (wall time, peak RSS)."""
    return f"benchmarks/{stage}/{name}.tsv"

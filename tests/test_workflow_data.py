"""The data rules through Snakemake itself, and the paper DAG."""

from __future__ import annotations

import shutil

import pytest

from lorastudy.controls import make_dolly
from lorastudy.data import sha256_file as sha256
from workflow_helpers import REPO, snakemake, write_config

from lorastudy.io import read_jsonl


def data_config(tmp_path, dolly):
    return {
        "dolly": {"local_copy": str(dolly), "sha256": sha256(dolly), "size_bytes": None},
        "data": {"test_size": 24, "val_size": 8, "subsets": {"1k": 40, "5k": 80, "15k": "all"}},
        "models": {"tiny": {"source": "tiny"}},
        "grid": {"models": ["tiny"], "subsets": ["1k"], "ranks": [2], "epochs": [1]},
    }


def test_paper_dag_dry_run_needs_no_gpu_or_network(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "paper.yaml"))
    assert "download_dolly" in result.stdout and "split" in result.stdout


def test_gemma2_and_gemma3_paper_dag_dry_run(tmp_path):
    configs = [str(REPO / "config" / name) for name in ("paper.yaml", "paper_gemma3.yaml")]
    result = snakemake(tmp_path, "-n", "--configfile", *configs)
    for model in ("gemma2_2b_en", "gemma3_1b", "gemma3_instruct_1b", "gemma3_4b_text"):
        assert f"model={model}" in result.stdout
    # Grouped (the default): per model, one finetune job per subset (3 ranks x 3 seeds side by side, each
    # trained to 3 epochs) and one evaluation job for the base and all 81 adapters.
    assert result.stdout.count("rule finetune:") == 4 * 3
    assert result.stdout.count("rule generate:") == 4
    assert "rule generate_base:" not in result.stdout
    # Per run: 3 subsets x 3 ranks x 3 seeds finetune jobs, and as many evaluation jobs plus the base.
    per_run = snakemake(tmp_path, "-n", "--configfile", *configs, "--config", "jobs=per_run")
    assert per_run.stdout.count("rule finetune:") == per_run.stdout.count("rule generate:") == 4 * 27
    assert per_run.stdout.count("rule generate_base:") == 4


@pytest.mark.parametrize(("layer", "models"), [
    ("paper_gemma4.yaml", ("gemma4_2b", "gemma4_instruct_2b", "gemma4_4b", "gemma4_instruct_4b")),
    ("paper_gemma3n.yaml", ("gemma3n_e2b", "gemma3n_instruct_e2b", "gemma3n_e4b", "gemma3n_instruct_e4b")),
])
def test_gemma4_and_gemma3n_paper_dags_dry_run(tmp_path, layer, models):
    configs = [str(REPO / "config" / name) for name in ("paper.yaml", layer)]
    result = snakemake(tmp_path, "-n", "--configfile", *configs)
    for model in models:
        assert f"model={model}" in result.stdout
    assert result.stdout.count("rule finetune:") == 4 * 3 and result.stdout.count("rule generate:") == 4


def test_grid_quantize_trains_each_model_again_on_its_own_quantized_preset(tmp_path):
    """grid.quantize [none, int8]: every model's jobs twice, the int8 ones on the same prepared preset (one prepare_model per model)."""
    configs = [str(REPO / "config" / name) for name in ("paper.yaml",)]
    result = snakemake(tmp_path, "-n", "--configfile", *configs, "--config", "grid={'quantize': ['none', 'int8']}")
    assert "model=gemma_2b_en_int8" in result.stdout and "model=gemma_7b_en_int8" in result.stdout
    assert result.stdout.count("rule finetune:") == 4 * 3 and result.stdout.count("rule generate:") == 4
    assert result.stdout.count("rule prepare_model:") == 2 and "results/models/gemma_2b_en_int8" not in result.stdout


def test_bad_config_stops_the_workflow_naming_the_key(tmp_path):
    config = data_config(tmp_path, make_dolly(tmp_path / "dolly.jsonl", n=10))
    config["data"]["val_sise"] = 3
    result = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config)), check=False)
    assert result.returncode != 0
    assert "data: Additional properties are not allowed ('val_sise' was unexpected)" in result.stderr + result.stdout


def test_data_rules_run_and_rerun_identically(tmp_path):
    dolly = make_dolly(tmp_path / "dolly.jsonl", n=300)
    config = write_config(tmp_path / "c.yaml", data_config(tmp_path, dolly))
    snakemake(tmp_path, "results/data/split_counts.csv", "--cores", "2", "--configfile", str(config))
    out = tmp_path / "results" / "data"
    assert len(read_jsonl(out / "test.jsonl")) == 24
    assert len(read_jsonl(out / "train_5k.jsonl")) == 80
    for name in ("download_dolly", "filter_context", "split"):
        assert (tmp_path / "logs" / "data" / f"{name}.log").is_file()
    first = {p.name: p.read_bytes() for p in out.glob("*.*")}
    shutil.rmtree(tmp_path / "results")
    snakemake(tmp_path, "results/data/split_counts.csv", "--cores", "2", "--configfile", str(config))
    assert {p.name: p.read_bytes() for p in out.glob("*.*")} == first


def test_bad_line_fails_the_job_with_file_and_line_and_no_output(tmp_path):
    dolly = make_dolly(tmp_path / "dolly.jsonl", n=50)
    with open(dolly, "a") as f:
        f.write('{"instruction": "x"}\n')
    config = write_config(tmp_path / "c.yaml", data_config(tmp_path, dolly))
    result = snakemake(tmp_path, "results/data/filtered.jsonl", "--cores", "1", "--configfile", str(config), check=False)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "data" / "filter_context.log").read_text()
    assert "line 51: missing field 'context'" in log
    assert not (tmp_path / "results" / "data" / "filtered.jsonl").exists()

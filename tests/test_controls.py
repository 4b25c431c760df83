"""The positive and negative controls: can the pipeline see a gain, and only a real one?

The slow test fine-tunes the real Gemma 3 270M on each control through the
study's own stages (filter, split, finetune, generate, score) and compares
with the base model as the report does: a paired bootstrap over test examples.
"""

from __future__ import annotations

import collections

import pandas as pd
import pytest

from lorastudy import controls, data

N_RECORDS, TRAIN, VAL, TEST = 144, 96, 16, 32


def test_positive_responses_are_the_instruction_reversed():
    for r in controls.positive_control(50, seed=3):
        words = r["instruction"].split(": ", 1)[1].split()
        assert r["response"].split() == words[::-1]
        assert r["context"] == ""


def test_negative_control_shuffles_every_response_away_from_its_instruction():
    positive, negative = controls.positive_control(200), controls.negative_control(200)
    assert [r["instruction"] for r in negative] == [r["instruction"] for r in positive]
    assert sorted(r["response"] for r in negative) == sorted(r["response"] for r in positive)
    assert all(n["response"] != p["response"] for n, p in zip(negative, positive))


def test_responses_share_almost_no_words():
    # What a model can learn from the negative control is the responses' form;
    # words common to many responses would make that worth ROUGE points.
    counts = collections.Counter(w for r in controls.positive_control(2000) for w in set(r["response"].split()))
    assert counts.most_common(1)[0][1] <= 10  # in at most 0.5% of the responses


def test_cli_writes_a_control_that_the_study_reads(tmp_path):
    from lorastudy.cli import main

    main(["control", "negative", str(tmp_path / "negative.jsonl"), "--records", "40"])
    records = list(data.read_dolly(tmp_path / "negative.jsonl"))
    assert len(records) == 40 and {r["category"] for r in records} == set(controls.CATEGORIES)
    with pytest.raises(ValueError, match="control kind"):
        controls.write_control("neutral", tmp_path / "x.jsonl", 4)


def test_made_up_data_has_dollys_size_and_the_checksum_the_benchmarks_pin(tmp_path):
    """benchmarks/configs/*_shape.yaml name this file by its sha256: the generator must not drift."""
    import yaml
    from workflow_helpers import REPO

    from lorastudy.cli import main

    main(["control", "made-up", str(tmp_path / "dolly_like.jsonl")])
    overlay = yaml.safe_load((tmp_path / "dolly_like.yaml").read_text())["dolly"]
    records = list(data.read_dolly(tmp_path / "dolly_like.jsonl"))
    assert len(records) == 15011 and {r["category"] for r in records} == set(controls.CATEGORIES)
    assert 0.3 < sum(bool(r["context"]) for r in records) / len(records) < 0.45  # Dolly: about a third
    assert overlay["sha256"] == "32319ffa3dcbcdf0609bf9fb53b45c4d862098328b4ed17c1ad87bda94e98867" and overlay["size_bytes"] == 12307832
    for config in ("gpu_2b_shape.yaml", "paper_2b_shape.yaml"):
        pinned = yaml.safe_load((REPO / "benchmarks" / "configs" / config).read_text())["dolly"]
        assert pinned == {k: overlay[k] for k in pinned}, config


def test_the_study_runs_on_a_control_through_the_overlay_it_writes(tmp_path, capsys):
    """The README's two commands: the control's own checksum passes download_dolly (the published one would refuse it)."""
    import yaml
    from workflow_helpers import REPO, snakemake

    from lorastudy.cli import main

    main(["control", "positive", str(tmp_path / "positive_control.jsonl")])
    overlay = tmp_path / "positive_control.yaml"
    assert f"--configfile config/config.yaml {overlay}" in capsys.readouterr().out
    assert yaml.safe_load(overlay.read_text())["dolly"]["sha256"] == data.sha256_file(tmp_path / "positive_control.jsonl")
    snakemake(tmp_path, "--cores", "1", "--until", "split", "--configfile", str(REPO / "config" / "config.yaml"), str(overlay))
    assert len((tmp_path / "results" / "data" / "train_250.jsonl").read_text().splitlines()) == 250


def _gain_over_base(kind: str, preset, d) -> dict[str, float]:
    from lorastudy.finetune import finetune
    from lorastudy.generate import generate
    from lorastudy.prompts import DEFAULT_TEMPLATE
    from lorastudy.scoring import paired_difference, score_generations

    controls.write_control(kind, d / "raw.jsonl", N_RECORDS)
    data.filter_context(d / "raw.jsonl", d / "filtered.jsonl")
    data.split_dolly(
        d / "filtered.jsonl", d / "test.jsonl", d / "val.jsonl", {"train": d / "train.jsonl"},
        d / "counts.csv", d / "duplicates.csv", {"train": TRAIN}, test_size=TEST, val_size=VAL, seed=0,
    )
    # One epoch at a high rate: 12 steps give the gain 40 steps at 2e-4 gave (+0.71 against +0.74), in a third of the time.
    adapters = [d / "adapter_epoch1.lora.h5"]
    finetune(
        preset, d / "train.jsonl", d / "val.jsonl", adapters, d / "history.csv", d / "train.json",
        rank=8, template=DEFAULT_TEMPLATE,
        settings={"learning_rate": 1e-3, "batch_size": 8, "sequence_length": 64, "pad_multiple": 16},
    )
    # One evaluation job for the base and the adapter, as the workflow's grouped jobs do.
    generate(preset, d / "test.jsonl", [d / "base.jsonl", d / "tuned.jsonl"], [d / "base.json", d / "tuned.json"], DEFAULT_TEMPLATE,
             adapters=adapters[-1:], rank=8, settings={"batch_size": TEST, "max_new_tokens": 16}, include_base=True)
    scores = {}
    for run in ("base", "tuned"):
        score_generations(d / f"{run}.jsonl", d / f"{run}_scores.csv", d / f"{run}_summary.json", d / f"{run}_by_category.csv")
        scores[run] = pd.read_csv(d / f"{run}_scores.csv")
    return paired_difference(scores["tuned"], scores["base"], "rougeL", samples=1000, seed=0)


@pytest.mark.slow
def test_fine_tuning_gains_on_the_positive_control_and_not_on_the_negative(gemma3_preset, tmp_path):
    gains = {}
    for kind in controls.CONTROLS:
        (tmp_path / kind).mkdir()
        gains[kind] = _gain_over_base(kind, gemma3_preset, tmp_path / kind)
    print("ROUGE-L gain over the base model:", gains)
    positive, negative = gains["positive"], gains["negative"]
    assert positive["low"] > 0.3, gains
    assert negative["low"] <= 0 and abs(negative["mean"]) < 0.05, gains

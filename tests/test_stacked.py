"""Adapters trained side by side on one base: each is the adapter its separate run trains.

The group trainer (lorastudy.stacked) and the per-run trainer (Keras `fit`,
lorastudy.finetune) are two implementations of one run; these tests hold
them to each other for Gemma, Gemma 2, Gemma 3 and Gemma 4 in float32, with mixed
ranks and seeds, several batch widths (so a step's rows are padded to the
widest run's), gradient clipping and a warm-up/decay schedule.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from test_architectures import SHAPES

from lorastudy import stacked_wave
from lorastudy.finetune import finetune
from lorastudy.training import NonFiniteLossError
from lorastudy.lora import read_factors, read_spec
from lorastudy.models import prepare_model
from lorastudy.paths import group_runs
from lorastudy.presets import preset_architecture
from lorastudy.prompts import DEFAULT_TEMPLATE
from lorastudy.stacked import GroupRun, finetune_group, waves_by_scale

# Several widths (no compile cost assumed), clipping and a schedule: every part of a run's own recipe.
SETTINGS = {
    "learning_rate": 5e-3, "batch_size": 4, "log_every_n_steps": 2, "sequence_length": 64, "pad_multiple": 8,
    "compile_seconds_per_width": 0.0, "expected_tokens_per_second": 1.0, "clip_norm": 0.5, "lr_schedule": "cosine", "warmup_steps": 2,
}
RUNS = [(2, 0), (4, 1), (4, 0)]  # (rank, seed)
EPOCHS = 2


def group(tmp_path: Path, runs=RUNS, epochs=EPOCHS) -> list[GroupRun]:
    root = tmp_path / "group"
    wanted = group_runs("m", "32", runs, epochs)
    return [GroupRun(**{**row, **{k: _under(root, v) for k, v in row.items() if k.endswith(("_path", "_paths"))}}) for row in wanted]


def _under(root: Path, value):
    return [str(root / p) for p in value] if isinstance(value, list) else str(root / value)


def train_alone(preset, data, run: GroupRun, tmp_path: Path, settings=SETTINGS) -> dict:
    out = tmp_path / "alone" / run.name
    adapters = [out / Path(p).name for p in run.adapter_paths]
    stats = finetune(preset, data["train"], data["val"], adapters, out / "history.csv", out / "train.json",
                     rank=run.rank, template=DEFAULT_TEMPLATE, settings={**settings, "seed": run.seed})
    return {"adapters": adapters, "history": out / "history.csv", "stats": stats}


def epoch_rows(path) -> list[dict]:
    with open(path) as f:
        return [row for row in csv.DictReader(f)]


def assert_same_run(preset, stacked: GroupRun, alone: dict, scale_tolerance: float = 0.0) -> None:
    """Same factors (to rtol 1e-4, or `scale_tolerance` of each factor's largest entry) and the same history."""
    for ours, theirs in zip(stacked.adapter_paths, alone["adapters"], strict=True):
        assert read_spec(ours) == read_spec(theirs)
        for (a, b), (a2, b2) in zip(factors(preset, ours), factors(preset, theirs), strict=True):
            assert a.shape == a2.shape and b.shape == b2.shape
            np.testing.assert_allclose(a, a2, rtol=1e-4, atol=max(2e-6, scale_tolerance * np.abs(a2).max()), err_msg=f"{ours}: A")
            np.testing.assert_allclose(b, b2, rtol=1e-4, atol=max(2e-6, scale_tolerance * np.abs(b2).max()), err_msg=f"{ours}: B")
            assert np.abs(b).max() > 0, "the adapter did not train"
    ours, theirs = epoch_rows(stacked.history_path), epoch_rows(alone["history"])
    assert [(r["epoch"], r["step"], r["kind"]) for r in ours] == [(r["epoch"], r["step"], r["kind"]) for r in theirs]
    for r, t in zip(ours, theirs):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if t[key]:
                assert float(r[key]) == pytest.approx(float(t[key]), rel=1e-4, abs=1e-6), (stacked.name, r["step"], key)


def test_stacked_adapters_equal_their_separate_runs_gemma(tiny_preset, tiny_data, tmp_path):
    runs = group(tmp_path)
    stats = finetune_group(tiny_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE,
                           tmp_path / "checkpoints", SETTINGS)
    assert [s["runs_side_by_side"] for s in stats] == [3, 3, 3]
    assert len(stats[0]["batch_widths"]) > 1, "one width: the test would not pad any run's rows"
    for run in runs:
        assert_same_run(tiny_preset, run, train_alone(tiny_preset, tiny_data, run, tmp_path))
    written = json.loads(Path(runs[0].stats_path).read_text())
    assert written["rank"] == 2 and written["trainable_parameters"] < json.loads(Path(runs[1].stats_path).read_text())["trainable_parameters"]
    assert not (tmp_path / "checkpoints").exists(), "a finished group leaves no resume state"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def other_preset(request, tmp_path_factory, tiny_data):
    dest = tmp_path_factory.mktemp(request.param) / "preset"
    return prepare_model(request.param, {"source": "tiny", "tiny": SHAPES[request.param]}, dest, train_path=tiny_data["train"], sequence_length=64)


@pytest.fixture(scope="module", params=["gemma", "gemma3n", "gemma4"])
def resumable_preset(request, tiny_preset, tmp_path_factory, tiny_data):
    if request.param == "gemma":
        return tiny_preset
    dest = tmp_path_factory.mktemp(f"resume_{request.param}") / "preset"
    return prepare_model(request.param, {"source": "tiny", "tiny": SHAPES[request.param]}, dest, train_path=tiny_data["train"], sequence_length=64)


def test_stacked_adapters_equal_their_separate_runs_gemma2_to_gemma4_and_gemma3n(other_preset, tiny_data, tmp_path):
    runs = group(tmp_path, runs=[(2, 0), (4, 1)], epochs=1)
    finetune_group(other_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE, tmp_path / "ck", SETTINGS)
    # Gemma 2 and 3 train the very same numbers stacked and alone; Gemma 4's and 3n's do not, though
    # the losses agree to 1e-6: XLA sums their steps in another order under vmap, and Adam's
    # normalisation magnifies that rounding in the smallest gradients (measured after 8 steps:
    # 7e-4 of a factor's largest entry for Gemma 4, 2e-4 for Gemma 3n).
    tolerance = 2e-3 if preset_architecture(other_preset) in ("gemma4", "gemma3n") else 0.0
    for run in runs:
        assert_same_run(other_preset, run, train_alone(other_preset, tiny_data, run, tmp_path), tolerance)


def test_packed_stacked_adapters_equal_their_separate_runs(tiny_preset, tiny_data, tmp_path):
    settings = {**SETTINGS, "packing": True}
    runs = group(tmp_path, runs=[(2, 1), (4, 0)], epochs=1)
    finetune_group(tiny_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE, tmp_path / "ck", settings)
    for run in runs:
        assert_same_run(tiny_preset, run, train_alone(tiny_preset, tiny_data, run, tmp_path, settings))


def test_a_fixed_alpha_trains_each_scale_in_its_own_wave(tmp_path):
    runs = group(tmp_path, runs=[(2, 0), (4, 0), (4, 1)])
    assert [[r.name for r in wave] for wave in waves_by_scale(runs, None)] == [[r.name for r in runs]]
    assert [[r.rank for r in wave] for wave in waves_by_scale(runs, 8.0)] == [[2], [4, 4]]


def test_a_diverging_adapter_stops_alone_and_the_others_finish(tiny_preset, tiny_data, tmp_path, monkeypatch, caplog):
    """An adapter that starts at infinity: its loss is not finite from the first step; the other trains on."""
    draw = stacked_wave.initial_factors

    def poisoned(layers, rank, seed):
        factors = draw(layers, rank, seed)
        return [(np.full_like(a, np.inf), b) for a, b in factors] if seed == 1 else factors

    monkeypatch.setattr(stacked_wave, "initial_factors", poisoned)
    runs = group(tmp_path, runs=[(4, 0), (4, 1)])
    with pytest.raises(NonFiniteLossError, match="32_r4_s1") as error:
        finetune_group(tiny_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE, tmp_path / "ck", SETTINGS)
    assert "32_r4_s0" not in str(error.value)
    good, bad = runs
    assert all(Path(p).is_file() for p in good.adapter_paths) and Path(good.stats_path).is_file()
    assert not any(Path(p).exists() for p in bad.adapter_paths) and not Path(bad.stats_path).exists()
    assert "32_r4_s1: the loss became NaN or infinite in epoch 1" in caplog.text
    # The finished run is kept for a rerun, which republishes it without training.
    monkeypatch.setattr(stacked_wave, "initial_factors", draw)
    Path(good.adapter_paths[0]).unlink()
    with pytest.raises(NonFiniteLossError):
        finetune_group(tiny_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE, tmp_path / "ck", SETTINGS)
    assert Path(good.adapter_paths[0]).is_file()


def test_a_group_stopped_after_an_epoch_resumes_from_it(resumable_preset, tiny_data, tmp_path, monkeypatch):
    """Interrupted after epoch 1's checkpoint, the rerun trains epoch 2 only and ends where an uninterrupted group does."""

    runs = group(tmp_path, runs=[(2, 0), (4, 1)])
    checkpoint = tmp_path / "ck"
    save = stacked_wave.Wave._save

    def save_then_stop(self, epoch):
        save(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(stacked_wave.Wave, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune_group(resumable_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE, checkpoint, SETTINGS)
    assert Path(runs[0].adapter_paths[0]).is_file() and not Path(runs[0].adapter_paths[1]).exists()
    monkeypatch.setattr(stacked_wave.Wave, "_save", save)
    resumed = finetune_group(resumable_preset, tiny_data["train"], tiny_data["val"], runs, DEFAULT_TEMPLATE, checkpoint, SETTINGS)
    assert [s["resumed_from_epoch"] for s in resumed] == [1, 1]
    assert [s["epochs_trained_this_run"] for s in resumed] == [1, 1]

    whole = group(tmp_path / "whole", runs=[(2, 0), (4, 1)])
    finetune_group(resumable_preset, tiny_data["train"], tiny_data["val"], whole, DEFAULT_TEMPLATE, tmp_path / "ck2", SETTINGS)
    for a, b in zip(runs, whole):
        assert _numbers(a.history_path) == _numbers(b.history_path)
        for (x, y), (x2, y2) in zip(factors(resumable_preset, a.adapter_paths[-1]), factors(resumable_preset, b.adapter_paths[-1])):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)


def _numbers(history) -> list[tuple]:
    """A history's losses and accuracies (not its clock columns)."""
    return [tuple(r[k] for k in ("epoch", "step", "kind", "loss", "accuracy", "val_loss", "val_accuracy")) for r in epoch_rows(history)]


def factors(preset, adapter) -> list[tuple[np.ndarray, np.ndarray]]:
    """An adapter file's factors, read at the layer indices of `preset` with LoRA on its layers.

    Left out: the factors of layers the model never calls (Gemma 3n's shared
    key/value layers' own projections), which stay as they started.
    """
    from lorastudy.backbones import unused_layers
    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.presets import load_causal_lm

    backbone = load_causal_lm(preset).backbone
    spec = read_spec(adapter)
    layers = enable_lora(backbone, LoraSpec(spec.rank, spec.targets))
    unused = {id(layer) for layer in unused_layers(backbone)}
    pairs = read_factors(adapter, backbone._lora_enabled_layers)
    return [pair for layer, pair in zip(layers, pairs, strict=True) if id(layer) not in unused]


def test_a_wave_checkpoint_killed_between_its_writes_resumes_from_the_complete_epoch(tmp_path, monkeypatch):
    """A kill after the next epoch's arrays are written but before its state: the last state names its own arrays."""
    from lorastudy import checkpoints

    saved = checkpoints.WaveCheckpoint(tmp_path, "key")
    saved.save(1, [np.ones(3)], {"history": [1]})

    def killed(path, obj):
        raise KeyboardInterrupt("killed before the state was written")

    monkeypatch.setattr(checkpoints, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        saved.save(2, [np.full(3, 2.0)], {"history": [1, 2]})
    epoch, arrays, state = checkpoints.WaveCheckpoint(tmp_path, "key").restore()
    assert epoch == 1 and state["history"] == [1]
    np.testing.assert_array_equal(arrays[0], np.ones(3))
    assert checkpoints.WaveCheckpoint(tmp_path, "another key").restore() is None


# Two grouped jobs in one process, as the resident worker runs a grid's, sharing
# one compilation cache; prints the step programs cached after each. A job is
# (training file, checkpoint dir, its runs as `group` gives them).
PINNED_JOBS = """
import json, sys
from pathlib import Path
from lorastudy.prompts import DEFAULT_TEMPLATE
from lorastudy.stacked import finetune_group
preset, val, cache, jobs = sys.argv[1:]
settings = {"learning_rate": 5e-3, "batch_size": 4, "sequence_length": 64, "batch_widths": [32, 48, 64]}
report = []
for train, checkpoints, runs in json.loads(jobs):
    stats = finetune_group(preset, train, val, runs, DEFAULT_TEMPLATE, checkpoints, settings, compilation_cache={"dir": cache})
    steps = sorted(p.name for p in Path(cache).glob("jit_*_one-*-cache"))
    report.append({"widths": stats[0]["batch_widths"], "step_programs": steps})
print(json.dumps(report))
"""


def test_pinned_widths_let_a_smaller_subset_reuse_the_step_programs(tiny_preset, tiny_data, tmp_path):
    """train.batch_widths: a job on another subset trains at the same widths and compiles no step program of its own."""
    import dataclasses
    import subprocess
    import sys

    records = Path(tiny_data["train"]).read_text().splitlines()
    smaller = tmp_path / "train_16.jsonl"
    smaller.write_text("\n".join(records[:16]) + "\n")
    jobs = [(str(train), str(tmp_path / name / "ck"), [dataclasses.asdict(r) for r in group(tmp_path / name, runs=[(2, 0), (4, 1)], epochs=1)])
            for name, train in (("all", tiny_data["train"]), ("16", smaller))]
    args = [tiny_preset, tiny_data["val"], tmp_path / "cache", json.dumps(jobs)]
    done = subprocess.run([sys.executable, "-c", PINNED_JOBS, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["widths"] == second["widths"] == [32, 48, 64]
    assert any(name.startswith("jit_train_one") for name in first["step_programs"])
    assert second["step_programs"] == first["step_programs"]

"""A grouped job's base and traced steps, kept for the next job of the same model (lorastudy.resident).

Jobs run one after the other in one process, as the resident worker runs a
grid's finetune jobs. A job that takes the previous job's base must train
the adapters a freshly loaded base trains; one whose steps differ (another
learning-rate schedule length, LoRA rank) must not take the old ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorastudy import resident, stacked_wave
from lorastudy.prompts import DEFAULT_TEMPLATE
from lorastudy.stacked import finetune_group
from test_stacked import factors, group

CONSTANT = {"learning_rate": 5e-3, "batch_size": 4, "sequence_length": 64, "batch_widths": [32, 48, 64]}
# A schedule's length is the job's number of steps: a constant of the traced step.
SCHEDULED = {**CONSTANT, "lr_schedule": "cosine", "warmup_steps": 2}


@pytest.fixture
def smaller_train(tiny_data, tmp_path) -> Path:
    records = Path(tiny_data["train"]).read_text().splitlines()
    path = tmp_path / "train_16.jsonl"
    path.write_text("\n".join(records[:16]) + "\n")
    return path


@pytest.fixture
def kept(monkeypatch):
    """The resident worker's setting, and a count of the steps made (each a fresh trace of every program)."""
    made = []
    real = stacked_wave.stacked_steps
    monkeypatch.setattr(stacked_wave, "stacked_steps", lambda *a, **k: made.append(1) or real(*a, **k))
    monkeypatch.setattr(resident, "keep", True)
    resident.release()
    yield made
    resident.release()


def job(preset, train, val, tmp_path: Path, name: str, settings: dict, runs=((2, 0), (4, 1))):
    runs = group(tmp_path / name, runs=list(runs), epochs=1)
    stats = finetune_group(preset, train, val, runs, DEFAULT_TEMPLATE, tmp_path / name / "ck", settings)
    return runs, stats


def assert_same_adapters(preset, ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        for path, other in zip(a.adapter_paths, b.adapter_paths, strict=True):
            for x, y in zip(factors(preset, path), factors(preset, other), strict=True):
                np.testing.assert_allclose(x[0], y[0], rtol=1e-6, atol=1e-7, err_msg=path)
                np.testing.assert_allclose(x[1], y[1], rtol=1e-6, atol=1e-7, err_msg=path)
                assert np.abs(x[1]).max() > 0, "the adapter did not train"


def test_the_next_job_of_a_model_takes_its_base_and_steps_and_trains_the_same_adapters(kept, tiny_preset, tiny_data, smaller_train, tmp_path):
    val = tiny_data["val"]
    _, first = job(tiny_preset, tiny_data["train"], val, tmp_path, "first", CONSTANT)
    reused, second = job(tiny_preset, smaller_train, val, tmp_path, "second", CONSTANT)
    assert [s["base_from_previous_job"] for s in first + second] == [False, False, True, True]
    assert len(kept) == 1, "the second job traced its steps again"
    # A schedule: new steps; then the same schedule over fewer steps, new steps again. The base is taken throughout.
    _, third = job(tiny_preset, tiny_data["train"], val, tmp_path, "third", SCHEDULED)
    scheduled, fourth = job(tiny_preset, smaller_train, val, tmp_path, "fourth", SCHEDULED)
    assert third[0]["base_from_previous_job"] and fourth[0]["base_from_previous_job"] and len(kept) == 3
    # Another largest rank: another base.
    _, fifth = job(tiny_preset, smaller_train, val, tmp_path, "fifth", CONSTANT, runs=((2, 0), (8, 1)))
    assert not fifth[0]["base_from_previous_job"]

    resident.release()
    fresh, _ = job(tiny_preset, smaller_train, val, tmp_path, "second_fresh", CONSTANT)
    assert_same_adapters(tiny_preset, reused, fresh)
    resident.release()
    fresh, _ = job(tiny_preset, smaller_train, val, tmp_path, "fourth_fresh", SCHEDULED)
    assert_same_adapters(tiny_preset, scheduled, fresh)


def test_outside_a_resident_worker_nothing_outlives_the_job(tiny_preset, tiny_data, tmp_path):
    resident.release()
    job(tiny_preset, tiny_data["train"], tiny_data["val"], tmp_path, "one", CONSTANT)
    assert not resident.held()


def test_a_failed_job_leaves_no_base(kept, tiny_preset, tiny_data, tmp_path):
    job(tiny_preset, tiny_data["train"], tiny_data["val"], tmp_path, "one", CONSTANT)
    assert resident.held()
    with pytest.raises(FileNotFoundError):
        finetune_group(tiny_preset, tmp_path / "missing.jsonl", tiny_data["val"], group(tmp_path / "c", epochs=1), DEFAULT_TEMPLATE,
                       tmp_path / "ck2", CONSTANT)
    assert not resident.held()

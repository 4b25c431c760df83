"""LoRA fine-tuning of the tiny random-weight Gemma, on a CPU."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lorastudy.finetune import finetune
from lorastudy.generate import load_for_generation
from lorastudy.presets import load_causal_lm
from lorastudy.prompts import DEFAULT_TEMPLATE

FAST = {"learning_rate": 5e-3, "batch_size": 4, "log_every_n_steps": 2, "sequence_length": 64, "pad_multiple": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_preset, tiny_data):
    out = tmp_path_factory.mktemp("run")
    adapters = [out / f"adapter_epoch{e}.lora.h5" for e in (1, 2)]
    stats = finetune(
        tiny_preset, tiny_data["train"], tiny_data["val"], adapters, out / "history.csv", out / "train.json",
        rank=4, template=DEFAULT_TEMPLATE, settings=FAST,
    )
    return {"dir": out, "adapters": adapters, "stats": stats}


def _history(trained):
    return list(csv.DictReader(open(trained["dir"] / "history.csv")))


def test_two_epochs_write_one_adapter_each_and_the_loss_falls(trained):
    assert all(p.is_file() for p in trained["adapters"])
    epochs = [r for r in _history(trained) if r["kind"] == "epoch"]
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert float(epochs[1]["loss"]) < float(epochs[0]["loss"])
    assert float(epochs[1]["val_loss"]) < float(epochs[0]["val_loss"])
    steps = [float(r["loss"]) for r in _history(trained) if r["kind"] == "steps"]
    assert len(steps) == 8 and steps[-1] < steps[0]


def test_train_json_is_plausible(trained):
    stats = json.loads((trained["dir"] / "train.json").read_text())
    assert stats == trained["stats"]
    assert stats["training_examples"] == 32 and stats["steps"] == 16 and stats["architecture"] == "gemma"
    # KerasHub's Gemma LoRA factors are per head: A is [heads, hidden, rank], B [rank, head_dim].
    # Query (2 heads) and value (1 head) of 2 layers, hidden 64, head_dim 32, rank 4:
    assert stats["trainable_parameters"] == 2 * ((2 * 64 * 4 + 4 * 32) + (1 * 64 * 4 + 4 * 32))
    assert stats["total_parameters"] > stats["trainable_parameters"]
    assert stats["tokens_seen"] > stats["loss_tokens_seen"] > 0
    assert stats["tokens_per_second"] > 0 and stats["peak_host_memory_bytes"] > 0
    assert stats["dtype"] == "float32" and stats["backend"] == "cpu"
    assert not (trained["dir"] / "checkpoints").exists()


def _logits(causal_lm, tokens):
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}
    return np.asarray(causal_lm(x))


def test_adapter_loaded_back_reproduces_the_logits(tiny_preset, trained, tmp_path):
    tokens = np.array([[2, 40, 41, 42, 43, 44]], "int32")
    lm = load_causal_lm(tiny_preset)
    base = _logits(lm, tokens)
    lm.backbone.load_lora_weights(str(trained["adapters"][1]))
    tuned = _logits(lm, tokens)
    assert not np.allclose(base, tuned, atol=1e-4)
    # Saved from this model and loaded into a fresh one: the same logits.
    lm.backbone.save_lora_weights(str(tmp_path / "again.lora.h5"))
    fresh = load_causal_lm(tiny_preset)
    fresh.backbone.load_lora_weights(str(tmp_path / "again.lora.h5"))
    np.testing.assert_allclose(_logits(fresh, tokens), tuned, rtol=1e-6, atol=1e-6)


def test_wrong_rank_for_an_adapter_fails_clearly(tiny_preset, trained):
    from lorastudy.lora import AdapterError

    with pytest.raises(AdapterError, match=r"adapter_epoch1.lora.h5 has LoRA rank 4, but rank 8 was asked for"):
        load_for_generation(tiny_preset, trained["adapters"][0], rank=8)


def test_non_finite_loss_stops_without_an_adapter(tiny_preset, tiny_data, tmp_path):
    from lorastudy.training import NonFiniteLossError

    adapters = [tmp_path / "adapter_epoch1.lora.h5"]
    with pytest.raises(NonFiniteLossError, match="no adapter was written"):
        finetune(
            tiny_preset, tiny_data["train"], tiny_data["val"], adapters, tmp_path / "h.csv", tmp_path / "t.json",
            rank=4, template=DEFAULT_TEMPLATE, settings={**FAST, "learning_rate": 1e30},
        )
    assert not adapters[0].exists() and not (tmp_path / "h.csv").exists()


class Killed(Exception):
    pass


def test_a_run_resumed_after_its_first_epoch_equals_an_uninterrupted_one(tiny_preset, tiny_data, tmp_path, monkeypatch):
    """Adapter, optimizer state and batch order are restored: the resumed run's adapters are the same numbers."""
    from lorastudy import finetune as stage

    def run(out):
        adapters = [out / f"adapter_epoch{e}.lora.h5" for e in (1, 2, 3)]
        stats = finetune(
            tiny_preset, tiny_data["train"], tiny_data["val"], adapters, out / "history.csv", out / "train.json",
            rank=2, template=DEFAULT_TEMPLATE, settings=FAST,
        )
        return stats, adapters

    _, whole = run(tmp_path / "whole")
    save = stage.Checkpoints.save

    def save_then_die(self, epoch, *args, **kwargs):
        save(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise Killed

    monkeypatch.setattr(stage.Checkpoints, "save", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "resumed")
    monkeypatch.undo()
    stats, resumed = run(tmp_path / "resumed")
    assert (stats["resumed_from_epoch"], stats["epochs_trained_this_run"]) == (1, 2)
    for a, b in zip(whole, resumed):
        np.testing.assert_array_equal(_adapter_weights(a), _adapter_weights(b), err_msg=str(b))


def _adapter_weights(path) -> np.ndarray:
    import h5py

    found = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.append(obj[()].ravel()) if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" else None)
    return np.concatenate(found)


def test_packed_rows_take_fewer_steps_with_less_padding_and_the_loss_falls(tiny_preset, tiny_data, tmp_path, trained):
    adapters = [tmp_path / f"adapter_epoch{e}.lora.h5" for e in (1, 2)]
    stats = finetune(
        tiny_preset, tiny_data["train"], tiny_data["val"], adapters, tmp_path / "history.csv", tmp_path / "train.json",
        rank=4, template=DEFAULT_TEMPLATE, settings={**FAST, "packing": True, "sequence_length": 128},
    )
    unpacked = trained["stats"]  # the same records, one per row of at most 64 tokens
    assert stats["packing"] and stats["batch_widths"] == [128] and all(p.is_file() for p in adapters)
    assert stats["tokens_seen"] == unpacked["tokens_seen"] and stats["loss_tokens_seen"] == unpacked["loss_tokens_seen"]
    # Three records or so a row: fewer, fuller steps.
    assert stats["steps"] <= unpacked["steps"] / 2 and stats["padded_tokens_per_epoch"] < unpacked["padded_tokens_per_epoch"]
    assert stats["tokens_seen"] / 2 > 0.8 * stats["padded_tokens_per_epoch"]
    epochs = [r for r in csv.DictReader(open(tmp_path / "history.csv")) if r["kind"] == "epoch"]
    assert float(epochs[1]["loss"]) < float(epochs[0]["loss"]) and float(epochs[1]["val_loss"]) < float(epochs[0]["val_loss"])

"""train.gradient_checkpointing: each decoder block recomputed in the backward pass, the same adapters."""

from __future__ import annotations

import numpy as np
import pytest

from test_architectures import SHAPES
from test_stacked import SETTINGS, factors, group

from lorastudy.backbones import decoder_blocks
from lorastudy.finetune import finetune
from lorastudy.models import prepare_model
from lorastudy.presets import ModelError, load_causal_lm
from lorastudy.prompts import DEFAULT_TEMPLATE
from lorastudy.stacked import finetune_group


def wrapped(layer) -> bool:
    """Whether Keras wraps the layer's call to rematerialize it."""
    return layer.rematerialized_call(layer.call) != layer.call


def test_the_blocks_and_only_they_are_rematerialized(tiny_preset):
    plain, checkpointed = load_causal_lm(tiny_preset).backbone, load_causal_lm(tiny_preset, remat=True).backbone
    assert [wrapped(block) for block in checkpointed.transformer_layers] == [True, True]
    assert not wrapped(checkpointed.token_embedding)
    assert not any(wrapped(block) for block in plain.transformer_layers)


def test_a_checkpointed_run_trains_the_adapter_of_a_plain_one(tiny_preset, tiny_data, tmp_path):
    # The grouped trainer and the per-run one (Keras fit) each, with and without checkpointing.
    adapters = {}
    for checkpointing in (False, True):
        settings = {**SETTINGS, "gradient_checkpointing": checkpointing}
        [run] = group(tmp_path / f"group_{checkpointing}", runs=[(4, 0)], epochs=1)
        finetune_group(tiny_preset, tiny_data["train"], tiny_data["val"], [run], DEFAULT_TEMPLATE, tmp_path / f"ck_{checkpointing}", settings)
        alone = tmp_path / f"alone_{checkpointing}"
        finetune(tiny_preset, tiny_data["train"], tiny_data["val"], [alone / "adapter_epoch1.lora.h5"], alone / "history.csv",
                 alone / "train.json", rank=4, template=DEFAULT_TEMPLATE, settings={**settings, "seed": 0})
        adapters[checkpointing] = [run.adapter_paths[0], alone / "adapter_epoch1.lora.h5"]
    for plain, checkpointed in zip(adapters[False], adapters[True]):
        for (a, b), (a2, b2) in zip(factors(tiny_preset, plain), factors(tiny_preset, checkpointed), strict=True):
            # Rematerialized, the float32 sums run in another order: CI saw 2e-7 on a B entry of 6e-3.
            np.testing.assert_allclose(a2, a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b2, b, rtol=1e-5, atol=1e-6)
            assert np.abs(b).max() > 0


def test_gemma3n_refuses_checkpointing_with_the_key_named(tiny_data, tmp_path):
    """KerasHub 0.32's Gemma 3n block fails under Keras's rematerialization; the load says so before any step."""
    preset = prepare_model("gemma3n", {"source": "tiny", "tiny": SHAPES["gemma3n"]}, tmp_path / "preset",
                           train_path=tiny_data["train"], sequence_length=64)
    with pytest.raises(ModelError, match="train.gradient_checkpointing cannot be on for Gemma 3n"):
        load_causal_lm(preset, remat=True)


def test_gemma4_checkpointed_trains_the_adapter_of_a_plain_run(tiny_data, tmp_path):
    # Gemma 4's later blocks take their keys and values from an earlier block, and every
    # block its own slice of the per-layer embeddings: all of it recomputed in the backward pass.
    preset = prepare_model("gemma4", {"source": "tiny", "tiny": SHAPES["gemma4"]}, tmp_path / "preset", train_path=tiny_data["train"],
                           sequence_length=64)
    assert all(wrapped(block) for block in decoder_blocks(load_causal_lm(preset, remat=True).backbone))
    runs = {}
    for checkpointing in (False, True):
        [run] = group(tmp_path / f"group_{checkpointing}", runs=[(4, 0)], epochs=1)
        finetune_group(preset, tiny_data["train"], tiny_data["val"], [run], DEFAULT_TEMPLATE, tmp_path / f"ck_{checkpointing}",
                       {**SETTINGS, "gradient_checkpointing": checkpointing})
        runs[checkpointing] = run.adapter_paths[0]
    # As between Gemma 4's grouped and separate runs (test_stacked): XLA may sum in another
    # order, and Adam magnifies that rounding in the smallest gradients.
    for (a, b), (a2, b2) in zip(factors(preset, runs[False]), factors(preset, runs[True]), strict=True):
        np.testing.assert_allclose(a2, a, rtol=1e-4, atol=2e-3 * np.abs(a).max())
        np.testing.assert_allclose(b2, b, rtol=1e-4, atol=2e-3 * np.abs(b).max())
        assert np.abs(b).max() > 0

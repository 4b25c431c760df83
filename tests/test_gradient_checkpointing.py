"""train.gradient_checkpointing: each decoder block recomputed in the backward pass, the same adapters."""

from __future__ import annotations

import numpy as np

from test_stacked import SETTINGS, factors, group

from lorastudy.finetune import finetune
from lorastudy.presets import load_causal_lm
from lorastudy.prompts import DEFAULT_TEMPLATE
from lorastudy.stacked import finetune_group


def test_the_blocks_and_only_they_are_rematerialized(tiny_preset):
    def wrapped(layer) -> bool:  # Keras wraps the call of a layer it rematerializes
        return layer.rematerialized_call(layer.call) != layer.call

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
            np.testing.assert_allclose(a2, a, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(b2, b, rtol=1e-5, atol=1e-7)
            assert np.abs(b).max() > 0

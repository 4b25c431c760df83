"""The private API the study uses (lorastudy.internals) is still there: what an upgrade of keras, keras-hub or jax checks first."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from lorastudy import internals


@pytest.mark.parametrize(("module", "name"), internals.PRIVATE_API, ids=[f"{m}:{n}" for m, n in internals.PRIVATE_API])
def test_each_private_name_exists(module, name):
    found = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(found, part), f"{module}.{name} is gone: lorastudy.internals needs another way"
        found = getattr(found, part)


def test_lora_layer_indices_name_the_layers_enable_lora_gave_factors(tiny_preset):
    from lorastudy.presets import load_causal_lm

    backbone = load_causal_lm(tiny_preset).backbone
    assert internals.lora_layer_indices(backbone) == []
    backbone.enable_lora(2)
    with_weights = [layer for layer in internals.sublayers(backbone) if layer.weights]
    lora = [with_weights[i] for i in internals.lora_layer_indices(backbone)]
    assert lora and all(hasattr(layer, "lora_kernel_a") for layer in lora)
    assert sum(hasattr(layer, "lora_kernel_a") for layer in with_weights) == len(lora)


def test_variables_take_the_chosen_initializer_and_their_own_after(tiny_preset):
    import keras

    with internals.variables_initialized_by(lambda initializer: keras.initializers.Constant(3.0)):
        inside = keras.layers.Dense(2)
        inside.build((None, 2))
    outside = keras.layers.Dense(2)
    outside.build((None, 2))
    assert np.all(keras.ops.convert_to_numpy(inside.kernel) == 3.0)
    assert np.all(keras.ops.convert_to_numpy(outside.kernel) != 3.0)


def test_quantizing_with_one_collection_frees_every_replaced_kernel(tiny_preset):
    """Keras collects garbage for each variable a layer deletes; the kernels quantization replaces are freed without it."""
    import gc

    import jax

    from lorastudy.presets import load_causal_lm

    backbone = load_causal_lm(tiny_preset).backbone
    gc.collect()  # earlier tests' garbage, so that what follows counts this model's alone
    before = sum(a.nbytes for a in jax.live_arrays())
    with internals.one_collection_for_deleted_variables():
        backbone.quantize("int8")
        assert gc.collect() == 0  # Keras's per-variable collections are skipped
        inside = sum(a.nbytes for a in jax.live_arrays())
    assert inside == sum(a.nbytes for a in jax.live_arrays()) < before
    assert any(v.dtype == "int8" for v in backbone.weights)

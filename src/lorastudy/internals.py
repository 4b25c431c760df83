"""Every use of Keras's, KerasHub's and JAX's private API, in one place.

The study leans on a few internals that no public API offers (listed in
`PRIVATE_API`). An upgrade of keras, keras-hub or jax is checked against
them by tests/test_internals.py, which fails naming the one that moved;
each function here says what it stands in for.

A leaf of the package: it imports no other lorastudy module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# (module, attribute path) of every private name used below.
PRIVATE_API = (
    ("keras", "Layer._flatten_layers"),
    ("keras", "Variable._initialize_with_initializer"),
    ("keras.src.saving.saving_lib", "H5IOStore"),
    ("keras.src.backend.jax.distribution_lib", "distribute_data_input"),
    ("keras_hub.models", "Backbone.enable_lora"),  # public, but writes _lora_enabled_layers (below)
    ("keras_hub.src.models.gemma.gemma_decoder_block", "GemmaDecoderBlock._compute_attention_mask"),
    ("keras_hub.src.models.gemma3.gemma3_decoder_block", "Gemma3DecoderBlock._compute_attention_mask"),
    ("keras_hub.src.models.gemma.gemma_attention", "CachedGemmaAttention._use_fused_attention_op"),
    ("keras_hub.src.models.gemma3.gemma3_attention", "CachedGemma3Attention._use_fused_attention_op"),
    ("jax._src.xla_bridge", "_backends"),
)


def sublayers(model) -> list:
    """Every layer under `model`, depth first, in the order KerasHub numbers them for `enable_lora`."""
    return list(model._flatten_layers(include_self=False))


def lora_layer_indices(backbone) -> list[int]:
    """The positions (among `sublayers` that have weights) of the layers `enable_lora` gave factors; [] before it."""
    return list(getattr(backbone, "_lora_enabled_layers", None) or [])


def h5_store(path: str, mode: str):
    """Keras's own HDF5 store, which writes and reads the `.lora.h5` files as `save_lora_weights` does."""
    from keras.src.saving.saving_lib import H5IOStore

    return H5IOStore(path, mode=mode)


def distribute_data_input(value, layout, batch_dim_name: str):
    """A host array placed split over a Keras distribution's devices (what Keras's `fit` does with each batch)."""
    from keras.src.backend.jax import distribution_lib

    return distribution_lib.distribute_data_input(value, layout, batch_dim_name)


def wrap_attention_mask(block, wrapper: Callable) -> None:
    """Route a decoder block's attention mask through `wrapper(original, *args)`; KerasHub has no hook for it."""
    original = block._compute_attention_mask
    block._compute_attention_mask = lambda *args: wrapper(original, *args)


def without_fused_attention(model) -> None:
    """KerasHub's attention layers under `model` take XLA's path instead of cuDNN's fused kernel."""
    for layer in sublayers(model):
        if hasattr(layer, "_use_fused_attention_op"):
            layer._use_fused_attention_op = lambda: False


@contextmanager
def variables_initialized_by(choose: Callable[[Any], Any]) -> Iterator[None]:
    """Keras variables made here are initialized with `choose(initializer)` in place of their own initializer.

    Keras offers no switch for what a variable is first filled with; this
    patches the one method that applies the initializer, restored on exit.
    """
    import keras

    variable = keras.Variable  # the backend's variable class
    initialize = variable._initialize_with_initializer

    def chosen(self, initializer):
        return initialize(self, choose(initializer))

    variable._initialize_with_initializer = chosen
    try:
        yield
    finally:
        variable._initialize_with_initializer = initialize


@contextmanager
def one_collection_for_deleted_variables() -> Iterator[None]:
    """Keras's `Layer.__delattr__` runs a full `gc.collect()` for each variable it deletes; here it runs once, on exit.

    Quantizing deletes every float kernel it replaces. With JAX, torch and
    TensorFlow's objects on the heap, each collection takes about 0.3 s on a
    CPU: 29 of the 30 s a tiny Gemma 3n's int8 quantization took (91
    layers). A deleted kernel's buffer is freed by its reference count
    without them (tests/test_internals.py checks that a collection on exit
    frees no more), so device memory falls layer by layer as before.
    """
    import gc

    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        collect()


def jax_started() -> bool:
    """Whether JAX has created its backends (and so read CUDA_VISIBLE_DEVICES) in this process."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bridge is not None and bool(getattr(bridge, "_backends", None))

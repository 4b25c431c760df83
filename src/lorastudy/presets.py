"""Loading a prepared model: a KerasHub preset directory as a CausalLM, in the precision a job asks for.

A leaf of the package: every stage that loads a model (finetune, generate,
export) and every place that builds one (the model stage, the GGUF
converter) takes what it needs from here, and this module imports none of them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from lorastudy.backbones import config_sizes, is_nested_config, output_embedding
from lorastudy.quiet import filtered_stderr
from lorastudy.internals import one_collection_for_deleted_variables, variables_initialized_by


class ModelError(RuntimeError):
    """A model cannot be prepared or loaded; the message says which and why."""


def dtype_policies(precision: str = "auto", training: bool = True) -> tuple[str, str | None]:
    """The dtype to load a model with, and the policy of its LoRA layers (None: the same).

    - `float32`: everything in float32 (what `auto` means on a CPU).
    - `bfloat16` (what `auto` means on a GPU): the frozen base weights are
      stored and used in bfloat16, the LoRA layers compute in bfloat16 but
      keep their trainable factors, and so the optimizer state, in float32.
      Mixed precision where it matters, without Keras's mixed policy's float32
      copy of every frozen weight, which costs memory and a cast per step.
    - `mixed_bfloat16`: Keras's mixed policy, float32 variables everywhere.
    For generation the LoRA factors need no float32 copy.
    """
    if precision == "auto":
        import jax

        precision = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    if precision == "bfloat16":
        return "bfloat16", ("mixed_bfloat16" if training else None)
    return precision, None


def _saved_backbone(preset: str | os.PathLike) -> dict | None:
    """A preset directory's config.json (the backbone's class and configuration); None if it has none."""
    config_path = Path(preset) / "config.json"
    return json.loads(config_path.read_text()) if config_path.is_file() else None


def _config(preset: str | os.PathLike) -> dict:
    """A prepared preset's backbone configuration (config.json's `config`); empty if it has none."""
    saved = _saved_backbone(preset)
    return saved["config"] if saved is not None else {}


def attention_heads(preset: str | os.PathLike) -> tuple[int, int] | None:
    """A prepared preset's (query heads, key/value heads), from its config.json; None if it has none."""
    config = _config(preset)
    if not config:
        return None
    sizes = config_sizes(config)
    return sizes.query_heads, sizes.key_value_heads


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def causal_lm_preprocessor(cls, tokenizer, sequence_length: int):
    """A `cls` preprocessor, or without TensorFlow KerasHub's generic text one.

    KerasHub's Gemma 3 preprocessor insists on TensorFlow (for its images),
    which a GPU machine often lacks. This study tokenizes itself and uses the
    preprocessor only to carry the tokenizer, so the generic one serves.
    """
    import keras_hub

    if not tensorflow_available():
        cls = keras_hub.models.CausalLMPreprocessor
    return cls(tokenizer, sequence_length=sequence_length)


# What `train.quantize` may ask for: Keras's own weight quantization of the frozen base.
QUANTIZE_MODES = ("none", "int8", "int4", "float8")


def quantize_base(backbone, mode: str) -> None:
    """Quantize the frozen base's weights with Keras's own `quantize` (`mode` int8 or int4; "none": leave it).

    Call it before LoRA is enabled, as KerasHub's Gemma guide does: the
    adapters stay in the layers' float policy and train on top of the
    quantized kernels. Every layer is quantized except the token embedding:
    the training loss takes the output projection's matrix itself, chunk by
    chunk (`loss.ResponseLoss`, never the [tokens, vocabulary] logits), which
    a quantized embedding holds unscaled; left in float, training and
    answers use the same output layer. (Gemma 2B's embedding is about 1 GB
    of its 5 in bfloat16.) float8 is refused: Keras's float8 layers have no
    LoRA path (EinsumDense's float8 call raises NotImplementedError with
    LoRA on).
    """
    if mode not in QUANTIZE_MODES:
        raise ModelError(f"train.quantize must be one of {QUANTIZE_MODES}, not {mode!r}")
    if mode == "float8":
        raise ModelError("train.quantize: float8 cannot train LoRA: Keras's float8 layers have no LoRA path; use int8 or int4")
    if mode != "none":
        with filtered_stderr(), warnings.catch_warnings(), one_collection_for_deleted_variables():
            # Keras names every layer without weights to quantize (dropout, inputs): nothing is wrong.
            warnings.filterwarnings("ignore", message="Layer .* does not have a `quantize` method")
            embedding, _ = output_embedding(backbone)
            backbone.quantize(mode, filters=lambda layer: layer is not embedding)


def load_causal_lm(preset: str | os.PathLike, dtype: str | None = None, remat: bool = False):
    """Load a prepared preset (or any KerasHub preset) as a CausalLM task; `remat`: its decoder blocks rematerialized.

    Keras fixes a layer's rematerialization when the layer is made, so the
    blocks are made under `keras.RematScope`, by name: KerasHub names every
    Gemma's blocks `decoder_block_<i>`. Each block's activations are then
    recomputed in the backward pass (`train.gradient_checkpointing`).
    """
    import keras
    import keras_hub

    task = causal_lm_class(preset)
    config = _config(preset)
    if remat and is_nested_config(config):
        raise ModelError(
            f"{preset}: train.gradient_checkpointing cannot be on for Gemma 3n: KerasHub 0.32's Gemma 3n decoder block "
            "fails when Keras rematerializes it (JAX reports a boolean conversion of a traced value); set it to false"
        )
    blocks = [f"decoder_block_{i}" for i in range(config_sizes(config).layers if config else 0)] if remat else None
    scope = keras.RematScope(mode="list_of_layers", layer_names=blocks) if remat else contextlib.nullcontext()
    with filtered_stderr(), weights_from_the_preset(), scope:
        if tensorflow_available():
            return task.from_preset(str(preset), dtype=dtype)
        # Without TensorFlow, the generic text preprocessor (see causal_lm_preprocessor).
        preprocessor = keras_hub.models.CausalLMPreprocessor(keras_hub.tokenizers.Tokenizer.from_preset(str(preset)))
        return task.from_preset(str(preset), dtype=dtype, preprocessor=preprocessor)


def causal_lm_class(preset: str | os.PathLike):
    """KerasHub's task class for a preset: `CausalLM`, which picks the backbone's own, except for Gemma 4.

    For a Gemma 4 backbone, `CausalLM.from_preset` picks the first subclass
    registered for it, the speculative-decoding draft model
    (Gemma4AssistantCausalLM), which such a preset cannot build; the plain
    Gemma4CausalLM is named instead.
    """
    import keras_hub

    saved = _saved_backbone(preset)
    backbone = saved.get("registered_name", "") if saved is not None else str(preset)
    return keras_hub.models.Gemma4CausalLM if "gemma4" in backbone.lower() else keras_hub.models.CausalLM


@contextlib.contextmanager
def weights_from_the_preset() -> Iterator[None]:
    """Variables made here start as zeros instead of random draws: the preset's weights overwrite every one.

    `from_preset` builds the model with its initializers, then loads the
    file over them. Drawing Gemma 2B's 2.5 billion random numbers first took
    24 of a 30-second load on a CPU (benchmarks/results/finetune_job.md).
    Only random initializers are replaced; constants (norm scales, seeds)
    keep theirs. Keras offers no switch for this
    (`internals.variables_initialized_by` patches the one method, restored on exit).
    """
    import keras

    zeros, i = keras.initializers.Zeros(), keras.initializers
    random = (i.RandomNormal, i.RandomUniform, i.TruncatedNormal, i.VarianceScaling, i.Orthogonal)
    with variables_initialized_by(lambda initializer: zeros if isinstance(initializer, random) else initializer):
        yield


# What makes a Gemma a Gemma 2, 3 or 4, in KerasHub's own classes and
# flags (Gemma 2 is KerasHub's GemmaBackbone with these on): sliding-window
# attention in alternate layers (Gemma 3: five of every six), logit
# soft-capping (Gemma 2), query/key norms and two RoPE wavelengths (Gemma 3).
# Gemma 4's small models (E2B, E4B) add per-layer token embeddings, layers
# that reuse an earlier layer's keys and values, wider feed-forwards in those
# layers, wider heads and partial RoPE in the global layers.
# The window's size is each model's own. Defined here once: the tiny builder,
# the GGUF converter and the GPU benchmark's shapes all take their flags.
ARCHITECTURES = {
    "gemma": ("Gemma", {}),
    "gemma2": ("Gemma", {
        "query_head_dim_normalize": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "final_logit_soft_cap": 30.0,
        "attention_logit_soft_cap": 50.0,
        "use_sliding_window_attention": True,
    }),
    "gemma3": ("Gemma3", {
        "image_size": None,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "use_sliding_window_attention": True,
    }),
    "gemma4": ("Gemma4", {
        "image_size": None,
        "use_sliding_window_attention": True,
        "final_logit_soft_cap": 30.0,
        "hidden_size_per_layer_input": 16,
        "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True,
        "global_rope_partial_rotary_factor": 0.25,
    }),
    # Gemma 3n (E2B/E4B): its own backbone, with per-layer embeddings, AltUp's
    # parallel streams, LAuReL's low-rank residual, shared key/value layers.
    "gemma3n": ("Gemma3n", {
        "hidden_activation": "gelu_approximate",
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "max_position_embeddings": 32768,
        "hidden_size_per_layer_input": 16,
        "altup_num_inputs": 4,
        "altup_coef_clip": 120.0,
        "laurel_rank": 8,
        "num_kv_shared_layers": 2,
        "final_logit_soft_cap": 30.0,
    }),
}
# KerasHub's backbone class name -> architecture, where the class says it alone.
_BY_CLASS = {"Gemma3Backbone": "gemma3", "Gemma4Backbone": "gemma4", "Gemma3nBackbone": "gemma3n"}


def _architecture(class_name: str, post_ffw_norm: bool) -> str:
    short = class_name.rsplit(">", 1)[-1]
    if short in _BY_CLASS:
        return _BY_CLASS[short]
    if short == "GemmaBackbone":
        return "gemma2" if post_ffw_norm else "gemma"
    raise ModelError(f"not a Gemma backbone of KerasHub: {class_name or 'no class name'}")


def architecture(backbone) -> str:
    """`gemma`, `gemma2`, `gemma3`, `gemma3n` or `gemma4`, from a KerasHub backbone's class and flags (never its preset's name)."""
    return _architecture(type(backbone).__name__, bool(getattr(backbone, "use_post_ffw_norm", False)))


def preset_architecture(preset: str | os.PathLike) -> str:
    """The architecture of a prepared preset directory, from its config.json."""
    config = json.loads((Path(preset) / "config.json").read_text())
    return _architecture(config.get("registered_name", ""), bool(config["config"].get("use_post_ffw_norm")))

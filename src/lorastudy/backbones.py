"""What the study reads of a KerasHub Gemma backbone, in one place for every family.

Gemma 1 to 4 keep their decoder blocks, token embedding and sizes on the
backbone under one set of names (`transformer_layers`, `token_embedding`,
`num_layers`, ...), and name the layers LoRA adapts `query` ... `ffw_linear`.
Gemma 3n nests its text decoder in `language_model` (a Gemma3nTextModel) with
names of its own, and its adaptable layers are plain `Dense` layers named as
in transformers (`q_proj` ... `down_proj`). Every stage asks here, so that
the others hold no family switches.

A leaf of the package: it imports no other lorastudy module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The study's LoRA target names (KerasHub's Gemma layer names) -> Gemma 3n's layer names.
GEMMA3N_LAYERS = {
    "query": "q_proj",
    "key": "k_proj",
    "value": "v_proj",
    "attention_output": "o_proj",
    "ffw_gating": "gate_proj",
    "ffw_gating_2": "up_proj",
    "ffw_linear": "down_proj",
}
_TARGETS = {layer: target for target, layer in GEMMA3N_LAYERS.items()}


@dataclass(frozen=True)
class Sizes:
    """A backbone's sizes, whatever its family calls them."""

    layers: int
    query_heads: int
    key_value_heads: int
    head_dim: int
    hidden: int
    vocabulary: int


# Each family's config keys for `Sizes`' fields, in order.
_GEMMA_KEYS = ("num_layers", "num_query_heads", "num_key_value_heads", "head_dim", "hidden_dim", "vocabulary_size")
_GEMMA3N_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "text_hidden_size", "text_vocab_size")


def is_nested(backbone) -> bool:
    """Whether the decoder lives in `backbone.language_model` (Gemma 3n)."""
    return hasattr(backbone, "language_model") and hasattr(backbone, "embedding_processor")


def decoder_blocks(backbone) -> list:
    """The decoder blocks, first to last."""
    return list((backbone.language_model if is_nested(backbone) else backbone).transformer_layers)


def sizes(backbone) -> Sizes:
    """The backbone's sizes."""
    return config_sizes(backbone.get_config())


def is_nested_config(config: Mapping[str, Any]) -> bool:
    """Whether a backbone's configuration (a preset's config.json `config`) is Gemma 3n's, whose decoder is nested."""
    return "text_hidden_size" in config


def config_sizes(config: Mapping[str, Any]) -> Sizes:
    """The sizes in a backbone's configuration (a preset's config.json `config`)."""
    keys = _GEMMA3N_KEYS if is_nested_config(config) else _GEMMA_KEYS
    return Sizes(*(int(config[key]) for key in keys))


def output_embedding(backbone) -> tuple[Any, float | None]:
    """The embedding layer whose matrix projects hidden states to logits, and the logits' soft cap (None: none).

    Gemma 1-4's `ReversibleEmbedding` carries its soft cap; Gemma 3n's
    text model ties a plain `Embedding` and caps its logits itself.
    """
    if is_nested(backbone):
        text = backbone.language_model
        return text.embed_tokens.embedding, text.final_logit_soft_cap
    return backbone.token_embedding, backbone.token_embedding.logit_soft_cap


def output_matrix(embedding):
    """The [vocabulary, hidden] matrix of an `output_embedding` layer (its reverse matrix, transposed, if untied)."""
    import jax.numpy as jnp

    if getattr(embedding, "tie_weights", True):
        return embedding.embeddings.value
    return jnp.transpose(embedding.reverse_embeddings.value)


def unused_layers(backbone) -> list:
    """Layers the backbone builds but never calls: Gemma 3n's key and value projections (and norms) in the layers that reuse an earlier layer's.

    Their LoRA factors get no gradient, so B stays zero and they change
    nothing; transformers' Gemma 3n does not build them at all.
    """
    if not is_nested(backbone):
        return []
    kinds = ("k_proj", "v_proj", "k_norm", "v_norm")
    return [getattr(block.attention, kind) for block in decoder_blocks(backbone) if block.is_kv_shared_layer for kind in kinds]


def layer_names(backbone, targets: Iterable[str]) -> list[str]:
    """The backbone's own names of the layers the study calls `targets` (query, ..., ffw_linear)."""
    return [GEMMA3N_LAYERS[t] for t in targets] if is_nested(backbone) else list(targets)


def target_name(layer_name: str) -> str:
    """The study's name for an adaptable layer, from its name in any family's backbone."""
    return _TARGETS.get(layer_name, layer_name)


def hidden_states(backbone, features: Mapping[str, Any]):
    """The backbone's final hidden states for `features` (token_ids, padding_mask, ...), the padding mask passed on as given.

    Gemma 3n's functional backbone casts its padding mask to bool, which
    would merge the segment numbers of packed rows (`loss.attend_within_segments`);
    its two parts are called directly instead, as its CausalLM does when it
    generates.
    """
    if not is_nested(backbone):
        return backbone(dict(features))
    token_ids = features["token_ids"]
    embeddings, per_layer = backbone.embedding_processor({"token_ids": token_ids})
    return backbone.language_model(token_ids, features["padding_mask"], embeddings, per_layer)

"""LoRA adapters: which layers, what scale, and files that say so themselves.

KerasHub's `backbone.enable_lora(rank, target_layer_names)` puts LoRA on the
named `EinsumDense` layers (by default query and value) and its
`save_lora_weights` writes the factors to a `.lora.h5` file. That file holds
the rank but not the target layers or the LoRA alpha, both of which a reader
needs; this module stores them in the same file, in a `lorastudy` group that
KerasHub's own loader ignores, and reads them back before loading.

The effective update of a layer is (alpha / rank) · A·B; alpha defaults to
the rank (a scale of 1, KerasHub's behaviour).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from lorastudy.backbones import layer_names, target_name
from lorastudy.io import atomic_path
from lorastudy.internals import h5_store, lora_layer_indices, sublayers
from lorastudy.presets import quantize_base

# KerasHub's layer names in Gemma 1 to 4 decoder blocks (Gemma 4's shared-KV layers have no key or value);
# Gemma 3n names its own alike (`backbones.GEMMA3N_LAYERS`).
ATTENTION = ("query", "key", "value", "attention_output")
FEED_FORWARD = ("ffw_gating", "ffw_gating_2", "ffw_linear")
TARGETS = ATTENTION + FEED_FORWARD
DEFAULT_TARGETS = ("query", "value")


class AdapterError(ValueError):
    """An adapter file does not fit the model it is loaded into; the message names the file."""


@dataclass(frozen=True)
class LoraSpec:
    """What an adapter is: its rank, the layers it adapts, and its alpha."""

    rank: int
    targets: tuple[str, ...] = DEFAULT_TARGETS
    alpha: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target layers {unknown}; known: {', '.join(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "targets": list(self.targets), "alpha": self.alpha})


def enable_lora(backbone, spec: LoraSpec, dtype_policy: str | None = None, quantize: str = "none") -> list:
    """Enable LoRA on the spec's layers, on a base quantized first if `quantize` says so; return the adapted layers.

    With `dtype_policy` (e.g. "mixed_bfloat16"), the targeted layers take that
    policy first, so their LoRA factors are created in its variable dtype
    while the frozen kernels keep theirs; a quantized layer keeps it as the
    source of its quantized policy (int8_from_mixed_bfloat16).
    """
    names = layer_names(backbone, spec.targets)
    if dtype_policy is not None:
        for layer in sublayers(backbone):
            if layer.name in names and hasattr(layer, "enable_lora"):
                layer.dtype_policy = dtype_policy
    quantize_base(backbone, quantize)
    backbone.enable_lora(spec.rank, target_layer_names=names)
    layers = lora_layers(backbone)
    if not layers:
        raise ValueError(f"no layer of {type(backbone).__name__} is named any of {list(spec.targets)}")
    for layer in layers:
        layer.lora_alpha = spec.alpha if spec.alpha is not None else spec.rank
    return layers


def initial_factors(layers: Sequence, rank: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each LoRA layer's starting (A, B) at `rank`: A He-uniform (Keras's LoRA default), B zero.

    Drawn from `seed` alone, not from Keras's global random state, so that a
    run starts from the same adapter whether it trains alone or beside
    others of other ranks (`lorastudy.stacked`), whatever was drawn before.
    """
    import keras

    draw = keras.initializers.HeUniform(seed=keras.random.SeedGenerator(seed))
    return [
        (
            np.asarray(draw((*layer.lora_kernel_a.shape[:-1], rank), "float32")),
            np.zeros((rank, layer.lora_kernel_b.shape[-1]), "float32"),
        )
        for layer in layers
    ]


def set_factors(layers: Sequence, factors: Sequence[tuple[np.ndarray, np.ndarray]], scale: float = 1.0) -> None:
    """Put each layer's (A, B) into its LoRA variables, zero-padded up to the variables' rank.

    The padding adds nothing to A·B, so a rank-r adapter in variables of a
    larger rank computes what it computes alone; `scale` (alpha / rank of
    the adapter) is set on each layer as KerasHub reads it, alpha / rank of
    the variables.
    """
    for layer, (a, b) in zip(layers, factors, strict=True):
        layer.lora_kernel_a.assign(pad_rank(a, layer.lora_rank, axis=-1))
        layer.lora_kernel_b.assign(pad_rank(b, layer.lora_rank, axis=0))
        layer.lora_alpha = scale * layer.lora_rank


def pad_rank(factor: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """`factor` with zeros appended along its rank axis up to `rank`."""
    widths = [(0, 0)] * factor.ndim
    widths[axis] = (0, rank - factor.shape[axis])
    return np.pad(factor, widths)


def lora_layers(backbone) -> list:
    """The LoRA-enabled layers, in the order KerasHub indexes them in a `.lora.h5` file."""
    with_weights = [layer for layer in sublayers(backbone) if layer.weights]
    return [with_weights[i] for i in lora_layer_indices(backbone)]


def save_adapter(backbone, spec: LoraSpec, path: str | os.PathLike) -> None:
    """Write the adapter atomically: KerasHub's factors, plus the spec."""
    with atomic_path(path, suffix=".lora.h5") as tmp:
        backbone.save_lora_weights(str(tmp))
        with h5py.File(tmp, "a") as f:
            f.create_group("lorastudy").attrs["spec"] = spec.to_json()


def write_adapter(path: str | os.PathLike, spec: LoraSpec, layer_indices: Sequence[int], factors: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write factors held outside a backbone as `save_adapter` writes a backbone's: KerasHub's layout, plus the spec.

    `layer_indices` are KerasHub's (`internals.lora_layer_indices`), in the
    order of `lora_layers`; each (A, B) is cut to the spec's rank.
    """
    with atomic_path(path, suffix=".lora.h5") as tmp:
        store = h5_store(str(tmp), mode="w")
        store.make("lora")["rank"] = spec.rank
        for index, (a, b) in zip(layer_indices, factors, strict=True):
            inner = store.make(f"lora/{index}")
            inner["lora_kernel_a"] = np.asarray(a)[..., : spec.rank]
            inner["lora_kernel_b"] = np.asarray(b)[: spec.rank]
        store.close()
        with h5py.File(tmp, "a") as f:
            f.create_group("lorastudy").attrs["spec"] = spec.to_json()


def read_factors(path: str | os.PathLike, layer_indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's (A, B) from an adapter file, in the order of `layer_indices`."""
    store = h5_store(str(path), mode="r")
    try:
        # One entry at a time: an entry reads through the store's current group.
        return [_factors(store.get(f"lora/{i}")) for i in layer_indices]
    except (KeyError, ValueError) as error:
        raise AdapterError(f"adapter {path} does not hold the LoRA layers of this model ({error})") from None
    finally:
        store.close()


def _factors(entry) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(entry["lora_kernel_a"]), np.asarray(entry["lora_kernel_b"])


def load_padded_adapter(backbone, path: str | os.PathLike) -> LoraSpec:
    """Load an adapter into LoRA variables already enabled at its rank or a larger one (zero-padded).

    One set of variables, enabled once at the largest rank of a job, then
    serves adapters of every rank, and one compiled program answers for all
    of them. The adapter must adapt the same layers as the variables.
    """
    spec = read_spec(path)
    layers = lora_layers(backbone)
    enabled = sorted({target_name(layer.name) for layer in layers})
    if sorted(spec.targets) != enabled or spec.rank > layers[0].lora_rank:
        raise AdapterError(
            f"adapter {path} is {spec}, but this model has LoRA on {enabled} at rank {layers[0].lora_rank}; "
            "the layers must match and the rank be at most that"
        )
    set_factors(layers, read_factors(path, lora_layer_indices(backbone)), spec.scale)
    return spec


def read_spec(path: str | os.PathLike) -> LoraSpec:
    """The spec stored in an adapter; a plain KerasHub adapter has default targets and alpha."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter {path} does not exist")
    with h5py.File(path, "r") as f:
        if "lorastudy" in f:
            spec = json.loads(f["lorastudy"].attrs["spec"])
            return LoraSpec(spec["rank"], tuple(spec["targets"]), spec["alpha"])
    # A plain KerasHub adapter: read its rank as KerasHub's own loader does.
    store = h5_store(str(path), mode="r")
    try:
        return LoraSpec(int(store.get("lora")["rank"][()]))
    finally:
        store.close()


def load_adapter(backbone, path: str | os.PathLike, expected_rank: int | None = None) -> LoraSpec:
    """Enable LoRA as the adapter file says and load its factors into `backbone`."""
    spec = read_spec(path)
    if expected_rank is not None and spec.rank != expected_rank:
        raise AdapterError(
            f"adapter {path} has LoRA rank {spec.rank}, but rank {expected_rank} was asked for; "
            "both ranks must match"
        )
    enable_lora(backbone, spec)
    backbone.load_lora_weights(str(path))
    return spec


def parse_spec(rank: int, targets: Sequence[str] | None = None, alpha: float | None = None) -> LoraSpec:
    return LoraSpec(int(rank), tuple(targets or DEFAULT_TARGETS), alpha)

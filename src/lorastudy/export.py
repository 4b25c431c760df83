"""The export stage: a study's adapter in the forms people use elsewhere.

- A merged KerasHub preset: the base weights with the LoRA update
  (alpha / rank) · A·B added in, saved with `save_to_preset`, so plain
  `from_preset` loads the fine-tuned model with no LoRA code.
- A PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) with
  the tensor names and shapes PEFT expects for transformers' Gemma 1 to 4
  and Gemma 3n, which name their modules alike. Where the decoder layers
  sit depends on the class the checkpoint loads as (`HF_LAYERS`): a
  text-only causal LM, or a multimodal one (what `AutoModelForCausalLM`
  gives for Gemma 3 4B and up, Gemma 3n and Gemma 4), whose vision tower
  has modules of the same short names. So the adapter names every module
  it adapts by its whole path, and PEFT adds LoRA to the text decoder only.

KerasHub's LoRA factors follow its kernels' head axes. For the query, key and
value projections (kernel [heads, hidden, head_dim]) A is per head
([heads, hidden, rank]) and B is shared ([rank, head_dim]); their update is
exactly a PEFT LoRA of rank heads × rank whose B is block-diagonal, so that
is what is written (with PEFT's `rank_pattern` and `alpha_pattern` keeping
the scale). The attention output and the feed-forward projections convert at
the same rank. Any other kernel layout is refused with the layer named.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy.backbones import target_name, unused_layers
from lorastudy.io import atomic_dir
from lorastudy.lora import LoraSpec, load_adapter, lora_layers
from lorastudy.presets import architecture, load_causal_lm
from lorastudy.internals import sublayers

log = logging.getLogger(__name__)

# KerasHub layer names -> transformers' module names, the same in Gemma 1 to 4 and 3n.
HF_MODULES = {
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "attention_output": "self_attn.o_proj",
    "ffw_gating": "mlp.gate_proj",
    "ffw_gating_2": "mlp.up_proj",
    "ffw_linear": "mlp.down_proj",
}
# Where transformers keeps the decoder layers: Gemma*ForCausalLM, Gemma*ForConditionalGeneration.
HF_LAYERS = {"causal_lm": "model.layers", "conditional_generation": "model.language_model.layers"}
# The class `AutoModelForCausalLM` loads a Google checkpoint of each architecture as (Gemma 3:
# 270M and 1B; its 4B and up are multimodal, so their config says so: models.<name>.hf_class).
HF_CLASS = {"gemma": "causal_lm", "gemma2": "causal_lm", "gemma3": "causal_lm",
            "gemma3n": "conditional_generation", "gemma4": "conditional_generation"}
PER_HEAD_IN = ("btd,ndh->btnh", "bsd,kdh->bskh")  # query; key and value
PER_HEAD_OUT = ("btnh,nhd->btd",)  # attention output


class ExportError(ValueError):
    """An adapter cannot be converted exactly; the message names the layer."""


def _weights_with_layers(backbone) -> list:
    return [layer for layer in sublayers(backbone) if layer.weights]


def merged_preset(preset: str | os.PathLike, adapter: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Save base + adapter as one KerasHub preset, loadable with plain `from_preset`."""
    tuned = load_causal_lm(preset)
    load_adapter(tuned.backbone, adapter)
    # The kernel property of a LoRA layer is base + (alpha / rank) * A @ B.
    merged = {
        _weights_with_layers(tuned.backbone).index(layer): np.asarray(layer.kernel)
        for layer in lora_layers(tuned.backbone)
    }
    del tuned
    plain = load_causal_lm(preset)
    layers = _weights_with_layers(plain.backbone)
    for index, kernel in merged.items():
        layers[index].kernel.assign(kernel)
    with atomic_dir(dest) as tmp:
        plain.save_to_preset(str(tmp))
    log.info("merged %d LoRA layers of %s into %s", len(merged), adapter, dest)


def peft_factors(layer, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """PEFT's (lora_A [r', in], lora_B [out, r']) for one KerasHub LoRA layer, and PEFT's alpha.

    PEFT scales B·A by alpha' / r'; alpha' is chosen so that equals `scale`.
    """
    a, b = np.asarray(layer.lora_kernel_a, "float32"), np.asarray(layer.lora_kernel_b, "float32")
    equation = getattr(layer, "equation", None)
    if equation in PER_HEAD_IN:
        heads, hidden, rank = a.shape
        head_dim = b.shape[1]
        lora_a = a.transpose(0, 2, 1).reshape(heads * rank, hidden)
        lora_b = np.zeros((heads * head_dim, heads * rank), "float32")
        for i in range(heads):
            lora_b[i * head_dim : (i + 1) * head_dim, i * rank : (i + 1) * rank] = b.T
    elif equation in PER_HEAD_OUT:
        heads, head_dim, rank = a.shape
        lora_a = a.transpose(2, 0, 1).reshape(rank, heads * head_dim)
        lora_b = b.T
    elif a.ndim == 2 and b.ndim == 2:
        lora_a, lora_b = a.T, b.T
    else:
        raise ExportError(
            f"layer {layer.path}: no exact PEFT form for LoRA factors of shapes {a.shape} and {b.shape} "
            f"(equation {equation!r})"
        )
    return lora_a, lora_b, scale * lora_a.shape[0]


def _decoder_index(layer) -> int:
    match = re.search(r"decoder_block_(\d+)", layer.path)
    if match is None:
        raise ExportError(f"layer {layer.path}: not inside a decoder block; PEFT has no name for it")
    return int(match.group(1))


def peft_adapter(
    preset: str | os.PathLike,
    adapter: str | os.PathLike,
    dest: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    hf_class: str | None = None,
) -> dict[str, Any]:
    """Write the adapter in PEFT's format for transformers' `hf_class` (default: by architecture, `HF_CLASS`); returns its adapter_config."""
    from safetensors.numpy import save_file

    tuned = load_causal_lm(preset)
    hf_class = hf_class or HF_CLASS[architecture(tuned.backbone)]
    if hf_class not in HF_LAYERS:
        raise ExportError(f"hf_class {hf_class!r}: expected one of {sorted(HF_LAYERS)}")
    if getattr(tuned.backbone, "vision_encoder", None) is not None:
        # Its vision encoder's layers would need names of their own in the adapter; untested here, so refused.
        raise ExportError(
            f"{preset}: a Gemma 3 with its vision encoder has no PEFT export here; "
            "train on the text-only preset (e.g. gemma3_4b_text)"
        )
    spec: LoraSpec = load_adapter(tuned.backbone, adapter)
    tensors, ranks, alphas, modules = {}, {}, {}, []
    unused = {id(layer) for layer in unused_layers(tuned.backbone)}
    for layer in lora_layers(tuned.backbone):
        if id(layer) in unused:
            continue
        module = HF_MODULES.get(target_name(layer.name))
        if module is None:
            raise ExportError(f"layer {layer.path}: no transformers Gemma module corresponds to {layer.name!r}")
        lora_a, lora_b, alpha = peft_factors(layer, spec.scale)
        modules.append(f"{HF_LAYERS[hf_class]}.{_decoder_index(layer)}.{module}")
        tensors[f"base_model.model.{modules[-1]}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"base_model.model.{modules[-1]}.lora_B.weight"] = np.ascontiguousarray(lora_b)
        short = module.split(".")[-1]
        ranks.setdefault(short, lora_a.shape[0])
        alphas.setdefault(short, alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha if spec.alpha is not None else spec.rank,
        # Whole paths: a short name would also match a vision tower's modules (and Gemma 3n's unused ones).
        "target_modules": sorted(modules),
        # Per-head factors convert at rank heads x rank (see the module docstring).
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    with atomic_dir(dest) as tmp:
        save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("PEFT adapter of %d tensors written to %s", len(tensors), dest)
    return config


def chosen_runs(
    summary_path: str | os.PathLike, cells_path: str | os.PathLike, chosen: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """The runs to export per model: the one the config names (`export.runs`), else every seed's run of the best grid cell.

    The best cell has the highest ROUGE-L mean over its training seeds
    (summary_by_cell.csv), not the luckiest single seed; each of its seeds is
    exported, under its own run name.
    """
    from lorastudy.paths import BASE
    from lorastudy.replicates import cell_of_run
    from lorastudy.summary import best_runs, read_summary

    runs = read_summary(summary_path)
    tuned = runs[runs["run"] != BASE]
    out = {
        cell["model"]: sorted(tuned[(tuned["model"] == cell["model"]) & (tuned["run"].map(cell_of_run) == cell["run"])]["run"])
        for _, cell in best_runs(read_summary(cells_path)).iterrows()
    }
    out.update({model: [run] for model, run in (chosen or {}).items()})
    return out


def export_run(
    preset: str | os.PathLike,
    adapter: str | os.PathLike,
    merged_dest: str | os.PathLike,
    peft_dest: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    hf_class: str | None = None,
) -> None:
    """Both exports of one run."""
    merged_preset(preset, adapter, merged_dest)
    peft_adapter(preset, adapter, peft_dest, base_model_name_or_path, hf_class)

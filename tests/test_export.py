"""Exports of an adapter: a merged KerasHub preset, and a PEFT adapter that transformers loads."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from lorastudy.export import ExportError, merged_preset, peft_adapter, peft_factors
from lorastudy.lora import TARGETS, LoraSpec, enable_lora, load_adapter, save_adapter
from lorastudy.presets import load_causal_lm

TOKENS = np.array([[2, 40, 41, 42, 43, 44, 45, 46]], "int32")


def _logits(causal_lm, tokens=TOKENS):
    return np.asarray(causal_lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}))


def random_adapter(backbone, path) -> None:
    """LoRA on every projection, alpha 8 at rank 4 (scale 2), with random non-zero factors, saved to `path`."""
    spec = LoraSpec(4, TARGETS, alpha=8.0)
    rng = np.random.default_rng(0)
    for layer in enable_lora(backbone, spec):
        layer.lora_kernel_a.assign(rng.normal(0, 0.05, layer.lora_kernel_a.shape))
        layer.lora_kernel_b.assign(rng.normal(0, 0.05, layer.lora_kernel_b.shape))
    save_adapter(backbone, spec, path)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_preset):
    lm = load_causal_lm(tiny_preset)
    path = tmp_path_factory.mktemp("adapter") / "adapter_epoch1.lora.h5"
    random_adapter(lm.backbone, path)
    return path, _logits(lm)


def test_adapter_file_carries_targets_and_alpha(tiny_preset, adapter):
    path, expected = adapter
    lm = load_causal_lm(tiny_preset)
    spec = load_adapter(lm.backbone, path)
    assert spec == LoraSpec(4, TARGETS, 8.0) and spec.scale == 2.0
    np.testing.assert_allclose(_logits(lm), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(_logits(load_causal_lm(tiny_preset)), expected, atol=1e-3)


def test_trainable_parameters_follow_the_targets(tiny_preset):
    lm = load_causal_lm(tiny_preset)
    enable_lora(lm.backbone, LoraSpec(4, ("query", "value", "ffw_linear")))
    count = sum(int(np.prod(v.shape)) for v in lm.backbone.trainable_weights)
    # Per layer: query 2*64*4 + 4*32, value 1*64*4 + 4*32, ffw_linear 64*4 + 4*64.
    assert count == 2 * (640 + 384 + 512)


def test_merged_preset_loads_with_plain_from_preset_and_gives_the_same_logits(tiny_preset, adapter, tmp_path):
    path, expected = adapter
    merged_preset(tiny_preset, path, tmp_path / "merged")
    merged = load_causal_lm(tmp_path / "merged")
    assert not getattr(merged.backbone, "_lora_enabled_layers", [])
    np.testing.assert_allclose(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def transformers_logits(hf_dir, peft_dir, tokens):
    """transformers' model of `hf_dir`: its class name, its logits, and its logits with the PEFT adapter of `peft_dir`."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    name = type(base).__name__
    with torch.no_grad():
        plain = base(torch.tensor(tokens)).logits.numpy()
        tuned = peft.PeftModel.from_pretrained(base, peft_dir)
        return name, plain, tuned(torch.tensor(tokens)).logits.numpy()


def test_peft_adapter_on_transformers_gemma_gives_the_same_logits(tiny_preset, adapter, tmp_path):
    path, expected = adapter
    # The same random base weights in both frameworks, by KerasHub's own converter.
    load_causal_lm(tiny_preset).backbone.export_to_transformers(str(tmp_path / "hf_base"))
    config = peft_adapter(tiny_preset, path, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "hf_base"))
    assert {m.split(".", 3)[3] for m in config["target_modules"]} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert {m.rsplit(".", 3)[0] for m in config["target_modules"]} == {"model.layers"}
    assert config["rank_pattern"]["q_proj"] == 2 * 4 and config["rank_pattern"]["o_proj"] == 4
    _, plain, actual = transformers_logits(tmp_path / "hf_base", tmp_path / "peft", TOKENS)
    np.testing.assert_allclose(plain, _logits(load_causal_lm(tiny_preset)), rtol=1e-4, atol=1e-4)
    assert np.abs(actual - plain).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == config


def test_a_layout_without_exact_form_is_refused_naming_the_layer():
    layer = types.SimpleNamespace(
        path="decoder_block_3/attention/odd",
        equation="abcd,cde->abe",
        lora_kernel_a=np.zeros((2, 3, 4, 5)),
        lora_kernel_b=np.zeros((5, 6)),
    )
    with pytest.raises(ExportError, match="layer decoder_block_3/attention/odd: no exact PEFT form"):
        peft_factors(layer, 1.0)

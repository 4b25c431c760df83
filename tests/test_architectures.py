"""Gemma 2, 3 and 4 through the study: LoRA, answers in each one's chat format, the PEFT export.

Small random-weight backbones of KerasHub's own classes, with the features
that set them apart switched on: sliding-window attention (a 16-token window
that the test sequences cross), Gemma 2's logit soft-capping, Gemma 3's
query/key norms and its two RoPE wavelengths (six layers: five local, one
global), and Gemma 4's E2B/E4B features: per-layer token embeddings, layers
sharing an earlier layer's keys and values, double-wide feed-forwards there,
wider heads and partial RoPE in its global layers (six layers, every third
global), with its own chat turns (`<|turn>` ... `<turn|>`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_export import random_adapter, transformers_logits
from test_generate import whole_pass_answers
from test_loss import assert_packed_rows_score_each_record_alone

from lorastudy.backbones import hidden_states, is_nested, sizes, unused_layers
from lorastudy.export import peft_adapter
from lorastudy.finetune import finetune
from lorastudy.generate import generate, load_for_generation, stop_token_ids
from lorastudy.io import read_jsonl
from lorastudy.lora import TARGETS, lora_layers, read_spec
from lorastudy.models import prepare_model
from lorastudy.presets import causal_lm_class, load_causal_lm, preset_architecture
from lorastudy.prompts import PromptTemplate, chat_turns, template_for

SHAPES = {
    "gemma2": {"architecture": "gemma2"},
    "gemma3": {"architecture": "gemma3", "num_layers": 6},
    # Wider global heads, as E2B's; per-layer embeddings and shared key/value layers are the architecture's tiny defaults.
    "gemma4": {"architecture": "gemma4", "global_head_dim": 64},
    # Per-layer embeddings, AltUp, LAuReL, sparse activations and shared key/value layers are its tiny defaults.
    "gemma3n": {"architecture": "gemma3n"},
}
FAST = {"learning_rate": 5e-3, "batch_size": 4, "log_every_n_steps": 2, "sequence_length": 64, "pad_multiple": 32}
TOKENS = np.array([[2, *range(40, 63)]], "int32")  # 24 tokens: past the 16-token window


def model_inputs(causal_lm, tokens):
    """What a KerasHub CausalLM is called with: Gemma 4 takes positions too."""
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}
    if "position_ids" in causal_lm.backbone.input:
        inputs["position_ids"] = np.broadcast_to(np.arange(tokens.shape[1], dtype="int32"), tokens.shape)
    return inputs


def _logits(causal_lm, tokens=TOKENS):
    backbone = causal_lm.backbone
    if is_nested(backbone):
        # KerasHub 0.32's Gemma3nCausalLM called as a model marks its logits sparse and gives zeros;
        # its generation (call_with_cache) projects the hidden states as here.
        hidden = hidden_states(backbone, model_inputs(causal_lm, tokens))
        return np.asarray(backbone.language_model.token_embedding(hidden, reverse=True))
    return np.asarray(causal_lm(model_inputs(causal_lm, tokens)))


@pytest.fixture(scope="module", params=sorted(SHAPES))
def preset(request, tmp_path_factory, tiny_data):
    dest = tmp_path_factory.mktemp(request.param) / "preset"
    prepare_model(request.param, {"source": "tiny", "tiny": SHAPES[request.param]}, dest, train_path=tiny_data["train"], sequence_length=64)
    return request.param, dest


def test_the_architecture_comes_from_the_backbone(preset):
    architecture, path = preset
    assert preset_architecture(path) == architecture


def assert_kerashubs_own_weights(path):
    """Our load (no random draws before the file is read) gives exactly KerasHub's `from_preset` weights."""
    import keras

    # KerasHub's own load of the preset's task class (for Gemma 4 CausalLM.from_preset picks the draft model's).
    ours, theirs = load_causal_lm(path), causal_lm_class(path).from_preset(str(path))
    assert [w.path for w in ours.weights] == [w.path for w in theirs.weights]
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path)
    with pytest.raises(Exception):
        load_causal_lm(path / "missing")
    # The zeros are gone after a load, and after a failed one: new layers draw random weights again.
    layer = keras.layers.Dense(4)
    layer.build((None, 4))
    assert np.all(keras.ops.convert_to_numpy(layer.kernel) != 0)


def test_loading_gives_kerashubs_own_weights(preset):
    assert_kerashubs_own_weights(preset[1])


def test_loading_gemma_gives_kerashubs_own_weights(tiny_preset):
    assert_kerashubs_own_weights(tiny_preset)


def test_packed_records_attend_only_to_themselves(preset):
    assert_packed_rows_score_each_record_alone(preset[1])


def test_lora_trains_on_chat_turns_saves_every_epoch_and_answers(preset, tiny_data, tmp_path, monkeypatch):
    architecture, path = preset
    adapters = [tmp_path / f"adapter_epoch{e}.lora.h5" for e in (1, 2)]
    finetune(path, tiny_data["train"], tiny_data["val"], adapters, tmp_path / "history.csv", tmp_path / "train.json",
             rank=4, template=template_for("chat", architecture), settings=FAST)
    epochs = [r for r in csv.DictReader(open(tmp_path / "history.csv")) if r["kind"] == "epoch"]
    assert float(epochs[1]["loss"]) < float(epochs[0]["loss"])
    assert [read_spec(a).rank for a in adapters] == [4, 4]
    assert json.loads((tmp_path / "train.json").read_text())["architecture"] == architecture
    outs = [tmp_path / f"epoch{e}.jsonl" for e in (1, 2)]
    generate(path, tiny_data["test"], outs, [tmp_path / f"epoch{e}.json" for e in (1, 2)], template_for("chat", architecture),
             adapters=adapters, rank=4, settings={"batch_size": 4, "max_new_tokens": 8, "pad_multiple": 16})
    rows = read_jsonl(outs[1])
    assert len(rows) == len(read_jsonl(tiny_data["test"]))
    # The first pass over the prompts only answers as KerasHub's over the whole width (lorastudy.prefill).
    whole = whole_pass_answers(monkeypatch, path, tiny_data["test"], [tmp_path / "whole.jsonl"], [tmp_path / "whole.json"],
                               template_for("chat", architecture), adapters=adapters[1:], rank=4,
                               settings={"batch_size": 4, "max_new_tokens": 8, "pad_multiple": 16})
    assert whole == [r["prediction"] for r in rows]
    start, _ = chat_turns(architecture)
    assert rows[0]["prompt"].startswith(f"{start}user\n") and rows[0]["prompt"].endswith(f"{start}model\n")


def test_without_tensorflow_the_generic_text_preprocessor_serves(preset, tiny_data, tmp_path, monkeypatch):
    """KerasHub's Gemma 3 preprocessor asserts TensorFlow, which GPU machines often lack."""
    from lorastudy import presets

    architecture, _ = preset
    monkeypatch.setattr(presets, "tensorflow_available", lambda: False)
    path = prepare_model(architecture, {"source": "tiny", "tiny": SHAPES[architecture]}, tmp_path / "preset",
                         train_path=tiny_data["train"], sequence_length=64)
    assert json.loads((path / "preprocessor.json").read_text())["registered_name"] == "keras_hub>CausalLMPreprocessor"
    assert type(load_causal_lm(path).preprocessor).__name__ == "CausalLMPreprocessor"
    (stats,) = generate(path, tiny_data["test"], [tmp_path / "a.jsonl"], [tmp_path / "a.json"], template_for("chat", architecture),
                        settings={"batch_size": 4, "max_new_tokens": 4, "pad_multiple": 16})
    assert stats["prompts"] == len(read_jsonl(tiny_data["test"]))


def test_chat_answers_stop_at_end_of_turn(preset):
    architecture, path = preset
    tokenizer = load_for_generation(path).preprocessor.tokenizer
    end = tokenizer.token_to_id(chat_turns(architecture)[1])
    assert stop_token_ids(tokenizer, PromptTemplate(template_for("chat", architecture))) == (1, end)
    with pytest.raises(ValueError, match="must be one token of the model's tokenizer"):
        stop_token_ids(tokenizer, PromptTemplate("{instruction}{response} the end"))


def _random_norms(weights, seed=1):
    rng = np.random.default_rng(seed)
    for v in weights:
        if "norm" in v.path:
            v.assign(rng.normal(0, 0.3, v.shape))


def twins(preset, architecture, tmp):
    """A KerasHub preset and a transformers checkpoint with the same random weights, norms included.

    KerasHub's own converters make the pair: it exports Gemma 3 to
    transformers, and imports Gemma 2 from it (it does not export Gemma 2).
    """
    import keras_hub
    import torch
    import transformers

    lm = load_causal_lm(preset)
    b = lm.backbone
    if architecture == "gemma2":
        config = transformers.Gemma2Config(
            vocab_size=b.vocabulary_size, hidden_size=b.hidden_dim, intermediate_size=b.intermediate_dim // 2,
            num_hidden_layers=b.num_layers, num_attention_heads=b.num_query_heads, num_key_value_heads=b.num_key_value_heads,
            head_dim=b.head_dim, query_pre_attn_scalar=b.head_dim, sliding_window=b.sliding_window_size,
            final_logit_softcapping=b.final_logit_soft_cap, attn_logit_softcapping=b.attention_logit_soft_cap,
        )
        torch.manual_seed(0)
        hf = transformers.Gemma2ForCausalLM(config)
        for name, p in hf.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, 0, 0.3)
        hf.save_pretrained(tmp / "hf")
        backbone = keras_hub.models.Backbone.from_preset(str(tmp / "hf"), dtype="float32")
        lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=lm.preprocessor)
    elif architecture == "gemma3n":
        gemma3n_from_transformers(b, tmp / "hf")
    else:
        _random_norms(b.weights)
        b.export_to_transformers(str(tmp / "hf"))
        if architecture == "gemma4":
            proportional_rope(tmp / "hf" / "config.json")
    lm.save_to_preset(str(tmp / "keras"))
    return tmp / "keras", tmp / "hf"


def gemma3n_from_transformers(backbone, dest) -> None:
    """Save a random transformers Gemma3nForCausalLM of `backbone`'s shape to `dest`, and give `backbone` its weights.

    KerasHub has no Gemma 3n exporter, and its importer reads only the
    multimodal checkpoint; its own mapping of the text model's weights
    (`convert_gemma3n._port_language_model`) is used on the text one.
    """
    import torch
    import transformers
    from keras_hub.src.utils.transformers import convert_gemma3n

    from benchmarks.gemma_shapes import gemma3n_text_config

    config = gemma3n_text_config(backbone.get_config())
    torch.manual_seed(0)
    hf = transformers.Gemma3nForCausalLM(config)
    for name, p in hf.named_parameters():
        if "norm" in name or "scale" in name:
            torch.nn.init.normal_(p, 0, 0.3)
    hf.save_pretrained(dest)
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}

    missing = []

    class Loader:
        def get_tensor(self, key):
            return state[key.replace("model.language_model.", "model.")]

        def port_weight(self, variable, key, hook_fn=None):
            if key.replace("model.language_model.", "model.") not in state:
                missing.append(variable.path)
                return
            value = self.get_tensor(key)
            variable.assign(hook_fn(value, variable.shape) if hook_fn else value)

    convert_gemma3n._port_language_model(Loader(), backbone)
    # Only the projections KerasHub builds and never calls have no counterpart.
    assert sorted(missing) == sorted(v.path for layer in unused_layers(backbone) for v in layer.weights)


def proportional_rope(config_path) -> None:
    """Name the rotary embedding of Gemma 4's global layers as Google's checkpoints do (`rope_type: proportional`).

    KerasHub 0.32's exporter leaves it out, and transformers then rotates the
    first quarter of each head with frequencies over that quarter, not over
    the head as Gemma 4 (and KerasHub's own layers) do: logits differ by
    about 5e-3 at 24 tokens, and a real checkpoint is unaffected.
    """
    config = json.loads(config_path.read_text())
    config["rope_parameters"]["full_attention"]["rope_type"] = "proportional"
    config_path.write_text(json.dumps(config))


def test_peft_export_on_transformers_gives_kerashubs_logits(preset, tmp_path):
    architecture, path = preset
    keras_preset, hf_dir = twins(path, architecture, tmp_path)
    lm = load_causal_lm(keras_preset)
    random_adapter(lm.backbone, tmp_path / "adapter.lora.h5")
    # Gemma 4's shared layers have no key or value projection of their own (Gemma 3n's have theirs, unused).
    shared = getattr(lm.backbone, "num_kv_shared_layers", 0) if architecture == "gemma4" else 0
    assert len(lora_layers(lm.backbone)) == len(TARGETS) * sizes(lm.backbone).layers - 2 * shared
    expected = _logits(lm)
    peft_adapter(keras_preset, tmp_path / "adapter.lora.h5", tmp_path / "peft", base_model_name_or_path=str(hf_dir), hf_class="causal_lm")

    name, plain, actual = transformers_logits(hf_dir, tmp_path / "peft", TOKENS)
    assert name == {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3n": "Gemma3nForCausalLM",
                    "gemma4": "Gemma4ForCausalLM"}[architecture]
    np.testing.assert_allclose(plain, _logits(load_causal_lm(keras_preset)), rtol=1e-4, atol=1e-4)
    assert np.abs(actual - plain).max() > 1e-2
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def multimodal_twin(text_dir, dest) -> None:
    """transformers' multimodal class of a text checkpoint's architecture, with its weights and a tiny vision tower, saved to `dest`.

    It is what `AutoModelForCausalLM` loads Google's Gemma 3 4B and Gemma 4
    checkpoints as: the text decoder under `model.language_model`, and a
    vision tower whose attention has q_proj ... o_proj of its own.
    """
    import torch
    import transformers

    text = transformers.AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    if text.config.model_type == "gemma3_text":
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                 image_size=28, patch_size=14)
        config = transformers.Gemma3Config(text_config=text.config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    else:
        vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        config = transformers.Gemma4Config(text_config=text.config.to_dict(), vision_config=vision.to_dict(), audio_config=None)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    model.save_pretrained(dest)


@pytest.mark.parametrize("preset", ["gemma3", "gemma4"], indirect=True)
def test_peft_export_for_a_multimodal_checkpoint_adapts_its_text_decoder_only(preset, tmp_path):
    architecture, path = preset
    keras_preset, hf_dir = twins(path, architecture, tmp_path)
    multimodal_twin(hf_dir, tmp_path / "multimodal")
    lm = load_causal_lm(keras_preset)
    random_adapter(lm.backbone, tmp_path / "adapter.lora.h5")
    expected = _logits(lm)
    config = peft_adapter(keras_preset, tmp_path / "adapter.lora.h5", tmp_path / "peft", hf_class="conditional_generation")
    assert all(m.startswith("model.language_model.layers.") for m in config["target_modules"])

    name, plain, actual = transformers_logits(tmp_path / "multimodal", tmp_path / "peft", TOKENS)
    assert name == {"gemma3": "Gemma3ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration"}[architecture]
    assert np.abs(actual - plain).max() > 1e-2
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    # Exported for the text-only class, the adapter names no module of the multimodal model, and PEFT says so
    # (with short target names it adapted the vision tower and left the decoder's LoRA at its initialisation).
    peft_adapter(keras_preset, tmp_path / "adapter.lora.h5", tmp_path / "peft_text", hf_class="causal_lm")
    with pytest.raises(ValueError, match="not found in the base model"):
        transformers_logits(tmp_path / "multimodal", tmp_path / "peft_text", TOKENS)


SPLIT = """
import json, sys
import numpy as np
from lorastudy.backbones import decoder_blocks
from lorastudy.distribution import distributed
from lorastudy.presets import attention_heads, load_causal_lm

preset = sys.argv[1]
tokens = np.array([[2, *range(40, 63)]] * 2, "int32")
x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}
one = load_causal_lm(preset)
if "position_ids" in one.backbone.input:
    x["position_ids"] = np.broadcast_to(np.arange(tokens.shape[1], dtype="int32"), tokens.shape)
one = np.asarray(one(x))
with distributed(2, 2, heads=attention_heads(preset)):
    lm = load_causal_lm(preset)
    split = np.asarray(lm(x))
    block = decoder_blocks(lm.backbone)[0]
    # Gemma 3n's query and gate are plain Dense layers of their own names.
    query, gate = (block.attention.q_proj, block.mlp.gate_proj) if hasattr(block, "mlp") else (block.attention.query_dense, block.gating_ffw)
    specs = [list(layer.kernel.value.sharding.spec) for layer in (query, gate)]
print(json.dumps({"difference": float(np.abs(split - one).max()), "specs": specs}))
"""


def test_weights_split_over_two_devices_give_the_same_logits(preset):
    """KerasHub's Gemma layout map, by weight path, holds for Gemma 2, 3 and 4 too, and Gemma 3n's paths added to it."""
    architecture, path = preset
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", SPLIT, str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["difference"] < 1e-5
    # Two query heads split by head (Gemma 3n's query kernel [hidden, heads x head_dim] along its output axis); the feed-forward gate along its output axis.
    query = ["batch", "model"] if architecture == "gemma3n" else ["model", "batch", None]
    assert result["specs"] == [query, ["batch", "model"]]


def test_a_tiny_model_in_bfloat16_is_stored_and_loaded_as_kaggles_presets_are(tiny_data, tmp_path):
    """Stand-ins of a real preset's shape keep its precision on disk (half the bytes to write and read)."""
    shape = {"dtype": "bfloat16"}
    path = prepare_model("gemma", {"source": "tiny", "tiny": shape}, tmp_path / "preset", train_path=tiny_data["train"], sequence_length=64)
    assert json.loads((path / "config.json").read_text())["config"]["dtype"]["config"]["name"] == "bfloat16"
    with h5py.File(path / "model.weights.h5") as f:
        floats = [f[name].attrs.get("dtype") for name in _datasets(f) if f[name].dtype.kind != "i"]
    assert floats and set(floats) == {"bfloat16"}
    assert load_causal_lm(path, dtype="bfloat16").backbone.token_embedding.embeddings.dtype == "bfloat16"
    assert load_causal_lm(path, dtype="float32").backbone.token_embedding.embeddings.dtype == "float32"


def _datasets(group, prefix=""):
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            yield from _datasets(item, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}"


def test_a_multimodal_gemma4_keeps_its_text_decoder_and_its_weights():
    """Kaggle's Gemma 4 presets carry vision (and audio) encoders; the model stage keeps the text decoder alone."""
    import keras_hub

    from lorastudy.models import text_only, train_gemma_tokenizer
    from lorastudy.presets import ARCHITECTURES, causal_lm_preprocessor

    proto = train_gemma_tokenizer(["a few words to train on"] * 40, 300, chat_turns("gemma4"))
    tokenizer = keras_hub.models.Gemma4Tokenizer(proto=proto, has_vision_tokens=False, has_video_tokens=False)
    vision = keras_hub.models.Gemma4VisionEncoder(image_size=32, patch_size=8, num_heads=2, hidden_dim=32, num_layers=1, intermediate_dim=64,
                                                  head_dim=16, output_dim=64, pool_size=2, position_embedding_size=16, dtype="float32")
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=6, num_query_heads=2, num_key_value_heads=1, hidden_dim=64,
        intermediate_dim=128, head_dim=32, sliding_window_pattern=3, vision_encoder=vision, dtype="float32",
        **{**ARCHITECTURES["gemma4"][1], "image_size": 32},
    )
    preprocessor = causal_lm_preprocessor(keras_hub.models.Gemma4CausalLMPreprocessor, tokenizer, 64)
    text = text_only(keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor))
    assert sorted(text.backbone.input) == ["padding_mask", "position_ids", "token_ids"]
    assert text.backbone.vision_encoder is None
    theirs = {v.path: np.asarray(v) for v in backbone.weights}
    assert len(text.backbone.weights) < len(backbone.weights)
    for v in text.backbone.weights:
        np.testing.assert_array_equal(np.asarray(v), theirs[v.path], err_msg=v.path)
    assert text_only(text) is text

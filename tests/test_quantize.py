"""LoRA on a quantized base (train.quantize): Keras's own int8/int4 quantization of the frozen weights, before LoRA."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lorastudy import config as study_config
from lorastudy.finetune import finetune
from lorastudy.generate import generate, load_for_generation
from lorastudy.internals import lora_layer_indices
from lorastudy.lora import LoraSpec, enable_lora, read_factors, read_spec
from lorastudy.presets import ModelError, load_causal_lm, quantize_base
from lorastudy.prompts import DEFAULT_TEMPLATE
from lorastudy.stacked import GroupRun, finetune_group

FAST = {"learning_rate": 5e-3, "batch_size": 4, "log_every_n_steps": 2, "sequence_length": 64, "pad_multiple": 32, "quantize": "int8"}


@pytest.fixture(scope="module")
def indices(tiny_preset) -> list[int]:
    """Where the tiny Gemma's LoRA layers sit, as adapter files number them."""
    backbone = load_causal_lm(tiny_preset).backbone
    enable_lora(backbone, LoraSpec(4))
    return lora_layer_indices(backbone)


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tiny_preset, tiny_data):
    out = tmp_path_factory.mktemp("int8")
    adapters = [out / f"adapter_epoch{e}.lora.h5" for e in (1, 2)]
    stats = finetune(tiny_preset, tiny_data["train"], tiny_data["val"], adapters, out / "history.csv", out / "train.json",
                     rank=4, template=DEFAULT_TEMPLATE, settings=FAST)
    return {"dir": out, "adapters": adapters, "stats": stats}


def test_the_base_is_int8_and_only_the_adapters_train(tiny_preset):
    backbone = load_causal_lm(tiny_preset).backbone
    before = {v.path: v.dtype for v in backbone.weights}
    quantize_base(backbone, "int8")
    backbone.enable_lora(4)
    assert any(dtype == "int8" for dtype in (v.dtype for v in backbone.weights)) and "int8" not in before.values()
    assert {v.dtype for v in backbone.trainable_weights} == {"float32"}
    assert all("lora" in v.path for v in backbone.trainable_weights)


@pytest.fixture(scope="module", params=["gemma", "gemma3n"])
def float_preset(request, tiny_preset, tiny_data, tmp_path_factory):
    """The tiny Gemma, and a tiny Gemma 3n (its own output embedding, inside its text model)."""
    if request.param == "gemma":
        return tiny_preset
    from lorastudy.models import prepare_model

    return prepare_model("gemma3n", {"source": "tiny", "tiny": {"architecture": "gemma3n"}}, tmp_path_factory.mktemp("q3n") / "preset",
                         train_path=tiny_data["train"], sequence_length=64)


def test_the_training_loss_on_a_quantized_base_starts_where_the_float_bases_does(float_preset):
    """The loss reads the output embedding's matrix itself: it stays in float, or the loss is off by the int8 scale (thousands)."""
    import jax

    from lorastudy.backbones import output_embedding
    from lorastudy.loss import response_loss_model

    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 300, (4, 32)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens), "targets": np.roll(tokens, -1, 1),
         "loss_weights": np.ones(tokens.shape, "float32")}
    losses = {}
    for quantize in ("none", "int8", "int4"):
        lm = load_causal_lm(float_preset)
        enable_lora(lm.backbone, LoraSpec(4), quantize=quantize)
        model = response_loss_model(lm)
        # Jitted: run eagerly, each of Gemma 3n's many small ops compiles alone (minutes on a CPU).
        rows, _ = jax.jit(model.stateless_call)([v.value for v in model.trainable_variables],
                                                [v.value for v in model.non_trainable_variables], x)
        losses[quantize] = float(np.asarray(rows)[:, 0].sum() / x["loss_weights"].sum())
        assert output_embedding(lm.backbone)[0].embeddings.dtype == "float32", quantize
    assert losses["int8"] == pytest.approx(losses["none"], rel=0.02), losses
    assert losses["int4"] == pytest.approx(losses["none"], rel=0.02), losses


def test_lora_trains_on_an_int8_base_and_writes_the_usual_adapter(int8_run, indices):
    epochs = [r for r in csv.DictReader(open(int8_run["dir"] / "history.csv")) if r["kind"] == "epoch"]
    assert float(epochs[1]["loss"]) < float(epochs[0]["loss"])
    assert json.loads((int8_run["dir"] / "train.json").read_text())["quantize"] == "int8"
    # The adapter file is what it is for a float base: float32 factors of the run's rank.
    assert read_spec(int8_run["adapters"][1]).rank == 4
    factors = read_factors(int8_run["adapters"][1], indices)
    assert all(a.dtype == np.float32 and b.dtype == np.float32 and np.abs(b).sum() > 0 for a, b in factors)


def test_answers_come_from_the_same_int8_base(int8_run, tiny_preset, tiny_data, tmp_path):
    settings = {"batch_size": 4, "max_new_tokens": 8, "pad_multiple": 16}
    outs = [tmp_path / "base.jsonl", tmp_path / "epoch2.jsonl"]
    stats = generate(tiny_preset, tiny_data["test"], outs, [tmp_path / "base.json", tmp_path / "epoch2.json"], DEFAULT_TEMPLATE,
                     adapters=[int8_run["adapters"][1]], settings=settings, include_base=True, quantize="int8")
    assert [s["quantize"] for s in stats] == ["int8", "int8"]
    # The int8 base's logits are its own: not the float base's, and close to them.
    tokens = np.array([[2, 10, 20, 30, 40, 50]])
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}
    quantized = np.asarray(load_for_generation(tiny_preset, quantize="int8")(x))
    full = np.asarray(load_for_generation(tiny_preset)(x))
    assert not np.array_equal(quantized, full)
    assert np.abs(quantized - full).mean() < 0.1 * np.abs(full).mean()


def test_a_grouped_job_on_an_int8_base_matches_the_run_alone(int8_run, indices, tiny_preset, tiny_data, tmp_path):
    d = tmp_path / "r4_s0"
    run = GroupRun("r4_s0", 4, 0, tuple(str(d / f"adapter_epoch{e}.lora.h5") for e in (1, 2)), str(d / "history.csv"), str(d / "train.json"))
    d.mkdir()
    finetune_group(tiny_preset, tiny_data["train"], tiny_data["val"], [run], DEFAULT_TEMPLATE, tmp_path / "ck", FAST)
    # Not to 1e-4 as on a float base (tests/test_stacked.py): Keras's int8 layers round their inputs to int8
    # too, so a last-bit difference in a float sum (vmap orders some differently) can move a rounding step,
    # and Adam's first steps, which move every factor by about the learning rate whatever the gradient's
    # size, carry it on. The adapters point the same way (cosine > 0.99) and the losses agree to 1%.
    cosine = lambda x, y: float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))  # noqa: E731
    for ours, alone in zip(run.adapter_paths, int8_run["adapters"], strict=True):
        for (a, b), (a0, b0) in zip(read_factors(ours, indices), read_factors(alone, indices), strict=True):
            assert cosine(a, a0) > 0.99 and cosine(b, b0) > 0.99
    epochs = [[r for r in csv.DictReader(open(path)) if r["kind"] == "epoch"] for path in (run.history_path, int8_run["dir"] / "history.csv")]
    for ours, alone in zip(*epochs, strict=True):
        assert float(ours["loss"]) == pytest.approx(float(alone["loss"]), rel=0.01)


def test_float8_is_refused_naming_the_key():
    with pytest.raises(ModelError, match="float8"):
        quantize_base(object(), "float8")
    config = {"train": {"quantize": "float8"}, "models": {"m": {"train": {"quantize": "float8"}}}}
    with pytest.raises(study_config.ConfigError, match=r"models\.m\.train\.quantize: float8") as error:
        study_config.check_quantize(config)
    assert "  train.quantize: float8" in str(error.value)


def test_exports_of_an_int8_run_apply_to_the_full_precision_base(int8_run, tiny_preset, tmp_path):
    """As peers do: the adapter trained on the int8 base is exported onto the unquantized one (PEFT, merged preset).

    Each export gives what the full base with the adapter gives in KerasHub; that is near, not equal to, what
    the int8 base with the adapter answered from.
    """
    from test_export import TOKENS, _logits, transformers_logits

    from lorastudy.export import merged_preset, peft_adapter

    adapter = int8_run["adapters"][1]
    full = load_for_generation(tiny_preset, adapter)
    on_int8 = _logits(load_for_generation(tiny_preset, adapter, quantize="int8"))
    expected = _logits(full)
    assert not np.array_equal(expected, on_int8) and np.abs(expected - on_int8).mean() < 0.1 * np.abs(expected).mean()
    merged_preset(tiny_preset, adapter, tmp_path / "merged")
    np.testing.assert_allclose(_logits(load_causal_lm(tmp_path / "merged")), expected, rtol=1e-5, atol=1e-5)
    load_causal_lm(tiny_preset).backbone.export_to_transformers(str(tmp_path / "hf_base"))
    peft_adapter(tiny_preset, adapter, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "hf_base"))
    _, _, tuned = transformers_logits(tmp_path / "hf_base", tmp_path / "peft", TOKENS)
    np.testing.assert_allclose(tuned, expected, rtol=1e-4, atol=1e-4)


def test_an_unknown_quantize_mode_stops_the_config_naming_the_key():
    import yaml
    from conftest import REPO

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    bad = {**config, "train": {**config["train"], "quantize": "int3"}}
    with pytest.raises(study_config.ConfigError, match=r"  train\.quantize: 'int3' is not one of"):
        study_config.validate_config(bad, schema)
    config["models"]["gemma3_270m_q4km"]["train"] = {"quantize": "int2"}
    with pytest.raises(study_config.ConfigError, match=r"models\.gemma3_270m_q4km\.train\.quantize: 'int2' is not one of"):
        study_config.validate_config(config, schema)


def test_grid_quantize_adds_a_model_per_mode_on_the_same_preset():
    import yaml
    from conftest import REPO

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["grid"]["quantize"] = ["none", "int8", "int4"]
    study_config.validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    name = "gemma3_270m_q4km"
    assert config["grid"]["models"] == [name, f"{name}_int8", f"{name}_int4"]
    assert study_config.model_settings(config, f"{name}_int4", "train")["quantize"] == "int4"
    assert study_config.preset_model(config, f"{name}_int8") == study_config.preset_model(config, name) == name
    # Checked twice (a cluster job re-reads the config), it stays the same.
    before = yaml.safe_dump(config)
    study_config.validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    assert yaml.safe_dump(config) == before
    # Without none, the model is trained on the quantized base only; a name already taken is refused.
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["grid"]["quantize"] = ["int8"]
    study_config.validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    assert config["grid"]["models"] == [f"{name}_int8"]
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["grid"]["quantize"] = ["int8"]
    config["models"][f"{name}_int8"] = {"source": "tiny"}
    with pytest.raises(study_config.ConfigError, match=r"grid\.quantize: int8 would name a model gemma3_270m_q4km_int8"):
        study_config.validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"]["twin"] = {"source": "tiny", "base_model": "missing"}
    with pytest.raises(study_config.ConfigError, match=r"models\.twin\.base_model: 'missing'"):
        study_config.validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")

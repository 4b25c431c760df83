"""Config validation: defaults, and errors that name the key."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from conftest import REPO

from lorastudy.config import ConfigError, validate_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


def minimal() -> dict:
    return {
        "models": {"tiny": {"source": "tiny"}},
        "grid": {"models": ["tiny"], "subsets": ["1k"], "ranks": [4], "epochs": [1]},
    }


def test_defaults_are_filled_in():
    config = minimal()
    validate_config(config, SCHEMA)
    assert config["data"]["test_size"] == 500
    assert config["data"]["subsets"] == {"250": 250, "1k": 1000, "5k": 5000, "15k": "all"}
    assert config["dolly"]["sha256"] == "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec"
    assert config["prompt"]["template"] == "Instruction:\n{instruction}\n\nResponse:\n{response}"


@pytest.mark.parametrize(
    "change, key, message",
    [
        (lambda c: c.update(dtaa={}), "(top level)", "'dtaa' was unexpected"),
        (lambda c: c.setdefault("data", {}).update(seeed=1), "data", "'seeed' was unexpected"),
        (lambda c: c["grid"].update(ranks=[0]), "grid.ranks.0", "0 is less than the minimum of 1"),
        (lambda c: c["grid"].update(ranks=[-4]), "grid.ranks.0", "-4 is less than the minimum of 1"),
        (lambda c: c["grid"].update(epochs=[0]), "grid.epochs.0", "0 is less than the minimum of 1"),
        (lambda c: c.setdefault("data", {}).update(context="keep"), "data.context", "'keep' is not one of"),
        (lambda c: c["models"]["tiny"].update(source="hub"), "models.tiny.source", "'hub' is not one of"),
        (lambda c: c.setdefault("dolly", {}).update(sha256="abc"), "dolly.sha256", "does not match"),
        (lambda c: c.setdefault("data", {}).update(subsets={"1k": -1}), "data.subsets.1k", "is not valid"),
    ],
)
def test_errors_name_the_key(change, key, message):
    config = minimal()
    change(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert f"  {key}: " in str(error.value)
    assert message in str(error.value)


def test_grid_must_name_defined_models_and_subsets():
    config = minimal()
    config["grid"]["models"] = ["tiny", "gemma_9b"]
    config["grid"]["subsets"] = ["2k"]
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert "grid.models: 'gemma_9b' is not defined under models" in str(error.value)
    assert "grid.subsets: '2k' is not defined under data.subsets" in str(error.value)


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_configs_are_valid(name):
    validate_config(load(name), SCHEMA)


def _snakemake_merge(base: dict, override: dict) -> dict:
    # Snakemake merges --configfile over the Snakefile's configfile like this.
    from snakemake.utils import update_config

    merged = copy.deepcopy(base)
    update_config(merged, override)
    return merged


def test_paper_config_does_not_inherit_the_cpu_defaults():
    """Every setting config.yaml changes for the CPU is restated in paper.yaml."""
    merged = _snakemake_merge(load("config.yaml"), load("paper.yaml"))
    paper_alone = load("paper.yaml")
    validate_config(merged, SCHEMA)
    validate_config(paper_alone, SCHEMA)
    for section in merged:
        if section != "models":
            assert merged[section] == paper_alone[section], section
    assert merged["grid"]["models"] == ["gemma_2b_en", "gemma_7b_en"]


def test_model_overrides_merge_over_the_section():
    from lorastudy.config import model_settings

    config = minimal()
    config["models"]["tiny"]["train"] = {"batch_size": 2}
    validate_config(config, SCHEMA)
    assert model_settings(config, "tiny", "train")["batch_size"] == 2
    assert model_settings(config, "tiny", "train")["learning_rate"] == 5e-5
    assert model_settings(config, "tiny", "generate") == config["generate"]


def test_bad_model_override_names_the_key():
    config = minimal()
    config["models"]["tiny"]["train"] = {"batch_sise": 2, "learning_rate": -1}
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA)
    assert "models.tiny.train: Additional properties are not allowed ('batch_sise' was unexpected)" in str(error.value)
    assert "models.tiny.train.learning_rate: -1 is less than or equal to the minimum of 0" in str(error.value)


@pytest.mark.parametrize("layers", [
    ["config.yaml", "benchmarks/configs/gpu_2b_shape.yaml"],
    ["config.yaml", "paper.yaml", "benchmarks/configs/paper_2b_shape.yaml", "benchmarks/configs/paper_part_a.yaml"],
    ["config.yaml", "paper.yaml", "benchmarks/configs/paper_2b_shape.yaml", "benchmarks/configs/paper_part_b.yaml"],
    ["config.yaml", "paper.yaml", "paper_gemma3.yaml"],
    ["config.yaml", "paper.yaml", "paper_gemma4.yaml"],
])
def test_benchmark_configs_are_valid_as_snakemake_layers_them(layers):
    merged = {}
    for name in layers:
        path = REPO / name if "/" in name else REPO / "config" / name
        merged = _snakemake_merge(merged, yaml.safe_load(path.read_text()))
    validate_config(merged, SCHEMA)


def test_the_chat_format_takes_each_models_own_turns():
    """Gemma 4 has its own turn tokens; its instruction-tuned models in paper_gemma4.yaml get them, the pretrained ones the plain template."""
    from lorastudy.config import prompt_template
    from lorastudy.prompts import DEFAULT_TEMPLATE, template_for

    merged = {}
    for name in ("config.yaml", "paper.yaml", "paper_gemma4.yaml"):
        merged = _snakemake_merge(merged, load(name))
    validate_config(merged, SCHEMA)
    assert prompt_template(merged, "gemma4_instruct_2b") == template_for("chat", "gemma4")
    assert "<|turn>user" in prompt_template(merged, "gemma4_instruct_4b")
    assert prompt_template(merged, "gemma4_2b") == DEFAULT_TEMPLATE
    # With chat for every model, each gets its own turns.
    config = {**merged, "prompt": {"format": "chat"}, "models": {**merged["models"], "g3": {"source": "keras_hub", "preset": "gemma3_1b"}}}
    config["models"] = {k: {kk: vv for kk, vv in v.items() if kk != "prompt"} for k, v in config["models"].items()}
    validate_config(config, SCHEMA)
    assert prompt_template(config, "gemma4_2b") == template_for("chat", "gemma4")
    assert prompt_template(config, "g3") == template_for("chat", "gemma")


def test_dolly_eval_layer_sets_every_setting_the_protocol_fixes():
    merged = {}
    for name in ("config.yaml", "paper.yaml", "dolly_eval.yaml"):
        merged = _snakemake_merge(merged, load(name))
    validate_config(merged, SCHEMA)
    assert merged["generate"]["protocol"] == "dolly_eval" and merged["data"]["context"] == "include"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["generate"].update(temperature=0.7), "generate.temperature: the dolly_eval protocol needs 1.0, got 0.7"),
    (lambda c: c["generate"].update(seeds=[1, 2]), "generate.seeds: the dolly_eval protocol averages 5 generation seeds"),
    (lambda c: c["data"].update(context="drop"), "data.context: the dolly_eval protocol needs 'include', got 'drop'"),
    (lambda c: c["models"]["gemma_2b_en"].update(generate={"max_new_tokens": 64}),
     "models.gemma_2b_en.generate.max_new_tokens: the dolly_eval protocol needs 256, got 64"),
])
def test_dolly_eval_with_a_setting_changed_is_refused_by_name(change, message):
    merged = _snakemake_merge(load("paper.yaml"), load("dolly_eval.yaml"))
    change(merged)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(merged, SCHEMA)


def test_prompt_format_and_model_prompts_resolve_to_templates():
    from lorastudy.config import prompt_template
    from lorastudy.prompts import CHAT_TEMPLATE, DEFAULT_TEMPLATE

    config = minimal()
    config["models"].update(
        it={"source": "tiny", "prompt": {"format": "chat"}},
        own={"source": "tiny", "prompt": {"template": "Q: {instruction}\nA: {response}"}},
        same={"source": "tiny", "prompt": {}},
    )
    validate_config(config, SCHEMA)
    assert [prompt_template(config, m) for m in ("tiny", "it", "own", "same")] == [
        DEFAULT_TEMPLATE, CHAT_TEMPLATE, "Q: {instruction}\nA: {response}", DEFAULT_TEMPLATE,
    ]
    chat = minimal()
    chat["prompt"] = {"format": "chat"}
    validate_config(chat, SCHEMA)
    assert prompt_template(chat, "tiny") == CHAT_TEMPLATE


def test_a_bad_model_template_names_the_model():
    config = minimal()
    config["models"]["tiny"]["prompt"] = {"template": "{response} then {instruction}"}
    with pytest.raises(ConfigError, match=r"models\.tiny\.prompt\.template: prompt\.template must put \{instruction\} before"):
        validate_config(config, SCHEMA)


def test_grouped_jobs_refuse_a_model_split_over_gpus_by_name():
    config = minimal()
    config["models"]["tiny"]["train"] = {"model_parallel": 2}
    with pytest.raises(ConfigError, match=r"models.tiny.train.model_parallel: grouped jobs .* set jobs: per_run"):
        validate_config(copy.deepcopy(config), SCHEMA)
    validate_config({**config, "jobs": "per_run"}, SCHEMA)


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ("1k_r4_epoch1", r"export.runs.tiny: '1k_r4_epoch1' does not match"),  # the name runs had before seeds
        ("1k_r8_s0_epoch1", r"export.runs.tiny: '1k_r8_s0_epoch1' is not a run of the grid"),
    ],
)
def test_export_runs_take_the_names_runs_have_and_only_runs_of_the_grid(run, message):
    config = minimal()
    config["export"] = {"runs": {"tiny": run}}
    with pytest.raises(ConfigError, match=message):
        validate_config(config, SCHEMA)
    config["export"] = {"runs": {"tiny": "1k_r4_s0_epoch1"}}
    validate_config(config, SCHEMA)


def _properties(node: dict, path: str = ""):
    """Every property of the schema (nested, under additionalProperties and $defs too) as (dotted path, its schema)."""
    for name, sub in (node.get("properties") or {}).items():
        where = f"{path}.{name}" if path else name
        yield where, sub
        yield from _properties(sub, where)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _properties(node["additionalProperties"], f"{path}.<name>")
    for name, sub in (node.get("$defs") or {}).items():
        yield from _properties(sub, f"$defs.{name}")


def test_every_schema_property_is_described():
    schema = yaml.safe_load(SCHEMA.read_text())
    undescribed = [where for where, sub in _properties(schema) if not str(sub.get("description", "")).strip()]
    assert not undescribed, f"schema properties without a description: {undescribed}"
    # A comma in an unquoted flow-style description ends it and leaves the rest as a stray key.
    stray = [(where, key) for where, sub in _properties(schema) for key in sub if " " in key]
    assert not stray, f"keys that are no JSON Schema keyword: {stray}"
    assert len(list(_properties(schema))) > 70


@pytest.mark.parametrize(("section", "settings"), [("train", "TrainSettings"), ("generate", "GenerateSettings")])
def test_the_settings_classes_default_to_the_schema(section, settings):
    """Two places hold each default (the schema, which fills the config, and the class a stage reads it into): the same."""
    import dataclasses

    from lorastudy import finetune, generate

    cls = getattr(finetune if section == "train" else generate, settings)
    schema = yaml.safe_load(SCHEMA.read_text())["properties"][section]["properties"]
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert set(fields) == set(schema), f"{settings} and the schema's {section} differ in keys"
    for name, default in fields.items():
        expected = schema[name].get("default")
        assert (list(default) if isinstance(default, tuple) else default) == expected, f"{section}.{name}"


def test_config_readme_lists_every_key_as_the_schema_has_it(tmp_path):
    from lorastudy.config import KEYS_BEGIN, keys_markdown, load_schema, write_keys

    readme = REPO / "config" / "README.md"
    assert keys_markdown(load_schema(SCHEMA)) in readme.read_text(), "regenerate it: lorastudy config-keys --write config/README.md"
    stale = tmp_path / "README.md"
    stale.write_text("intro\n" + KEYS_BEGIN + "\n| old |\n<!-- end of every key -->\nafter\n")
    assert write_keys(stale, SCHEMA) and not write_keys(stale, SCHEMA)
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "| `train.stack_size` |" in text


def test_pinned_batch_widths_must_end_at_each_models_sequence_length():
    config = minimal()
    config["train"] = {"batch_widths": [64, 128]}
    with pytest.raises(ConfigError, match=r"train.batch_widths: the widest, 128, must be the sequence length of tiny, 256"):
        validate_config(config, SCHEMA)
    config = minimal()
    config["models"]["tiny"]["train"] = {"sequence_length": 128, "batch_widths": [64, 96]}
    with pytest.raises(ConfigError, match=r"models.tiny.train.batch_widths: the widest, 96, must be the sequence length of tiny, 128"):
        validate_config(config, SCHEMA)
    config["models"]["tiny"]["train"]["batch_widths"] = [96, 64, 128]
    validate_config(config, SCHEMA)

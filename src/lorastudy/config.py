"""Validation of the workflow config against its JSON schema.

Snakemake loads the config; this checks it before any rule is built, fills
the schema's defaults in place, and raises one error that names every bad
key by its dotted path (`train.learning_rate`), plus the checks that span
keys, which a schema cannot express (the grid names models and subsets that
must be defined).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

import jsonschema
import yaml

from lorastudy.data import DOLLY_RECORDS


class ConfigError(ValueError):
    """The config does not match the schema; the message names the keys."""


def _with_defaults(validator_class):
    # The pattern from jsonschema's FAQ (and Snakemake's own `validate`):
    # fill defaults while validating, so nested sections get theirs too.
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, _copy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def _key(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def load_schema(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def validate_config(config: MutableMapping[str, Any], schema_path: str | os.PathLike) -> None:
    """Check `config` against the schema at `schema_path`, filling defaults."""
    schema = load_schema(schema_path)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (_key(e), e.message))
    if errors:
        lines = [f"  {_key(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid config:\n" + "\n".join(lines))
    expand_quantize(config)
    check_model_overrides(config, schema)
    check_grid(config)
    check_base_models(config)
    check_grouped_jobs(config)
    check_quantize(config)
    check_batch_widths(config)
    check_export(config)
    check_protocol(config)
    resolve_prompts(config)


def resolve_prompts(config: MutableMapping[str, Any]) -> None:
    """Fill in each prompt template from its format, and check every template.

    A model's own `prompt.template` or `prompt.format` comes first, then the
    prompt section's template, then its format. The chat format takes the
    model's own turn tokens (Gemma 4 has its own, `prompts.template_for`).
    """
    from lorastudy.prompts import PromptTemplate, template_for

    section = config["prompt"]
    from_format = section["template"] is None
    if from_format:
        section["template"] = template_for(section["format"])
    places = [("prompt", section)]
    for name, spec in config["models"].items():
        own = spec.get("prompt") or {}
        architecture = chat_architecture(spec)
        if "template" not in own and ("format" in own or (from_format and architecture != "gemma")):
            own["template"] = template_for(own.get("format", section["format"]), architecture)
        if own:
            spec["prompt"] = own
            places.append((f"models.{name}.prompt", own))
    for where, prompt in places:
        try:
            PromptTemplate(prompt["template"])
        except ValueError as error:
            raise ConfigError(f"invalid config:\n  {where}.template: {error}") from None


def chat_architecture(spec: Mapping[str, Any]) -> str:
    """Whose chat turns a model takes, as far as its config says: a tiny model's architecture, or gemma4 for a Gemma 4 preset.

    Any other model gets Gemma 1-3's turns; a Gemma 4 under another name
    stops at its first job, where the template's end is not one token of
    its tokenizer (`generate.stop_token_ids` names prompt.template).
    """
    if spec["source"] == "tiny":
        return spec.get("tiny", {}).get("architecture", "gemma")
    return "gemma4" if "gemma4" in str(spec.get("preset", "")).lower() else "gemma"


def prompt_template(config: MutableMapping[str, Any], model: str) -> str:
    """The prompt template of one model (after `resolve_prompts`)."""
    return config["models"][model].get("prompt", {}).get("template", config["prompt"]["template"])


OVERRIDABLE = ("train", "generate")


def model_settings(config: MutableMapping[str, Any], model: str, section: str) -> dict[str, Any]:
    """The `train` or `generate` settings of one model: the section, then the model's overrides."""
    return {**config[section], **config["models"][model].get(section, {})}


def job_resources(config: MutableMapping[str, Any], model: str, rule: str) -> dict[str, Any]:
    """What a rule's job for `model` asks for: the resources section, then the model's overrides."""
    return {**config["resources"][rule], **config["models"][model].get("resources", {}).get(rule, {})}


def subset_records(config: MutableMapping[str, Any], subset: str) -> int:
    """A subset's training records: its count, or for 'all' Dolly's size (an upper bound, for sizing jobs only)."""
    size = config["data"]["subsets"][subset]
    return DOLLY_RECORDS if size == "all" else int(size)


def grouping_gpus(config: MutableMapping[str, Any], global_resources: Mapping[str, Any]) -> int:
    """The GPUs grouped finetune jobs are cut for: `gpus`, or with `auto` Snakemake's --resources gpu=N (1 without it)."""
    if config.get("gpus", "auto") != "auto":
        return int(config["gpus"])
    given = global_resources.get("gpu")
    return int(getattr(given, "value", given) or 1)


def largest_subset(config: MutableMapping[str, Any]) -> str:
    """The subset holding every other one (they are nested): 'all' if any, else the biggest."""
    subsets = config["data"]["subsets"]
    return max(subsets, key=lambda s: float("inf") if subsets[s] == "all" else subsets[s])


def check_model_overrides(config: MutableMapping[str, Any], schema: dict[str, Any]) -> None:
    """`models.<name>.train` and `.generate` must be valid once merged over their section."""
    lines = []
    for name in config["models"]:
        for section in OVERRIDABLE:
            validator = jsonschema.Draft202012Validator(schema["properties"][section])
            for e in validator.iter_errors(model_settings(config, name, section)):
                lines.append(f"  models.{name}.{section}{'.' if e.absolute_path else ''}{_key(e) if e.absolute_path else ''}: {e.message}")
    if lines:
        raise ConfigError("invalid config:\n" + "\n".join(sorted(lines)))


# What published Dolly results were scored under (DollyEval, from MiniLLM, Gu et
# al., ICLR 2024): 500 held-out records with their context, sampling at
# temperature 1 and top-p 1 over 5 seeds, prompts <= 256 and answers <= 256 tokens.
DOLLY_EVAL = {
    "data.context": "include",
    "data.test_size": 500,
    "generate.sampler": "random",
    "generate.temperature": 1.0,
    "generate.max_new_tokens": 256,
    "generate.max_prompt_tokens": 256,
}
DOLLY_EVAL_SEEDS = 5


def check_protocol(config: MutableMapping[str, Any]) -> None:
    """`generate.protocol: dolly_eval` holds only with every setting the protocol fixes (models' overrides too)."""
    if config["generate"]["protocol"] != "dolly_eval":
        return
    problems = []
    for key, expected in DOLLY_EVAL.items():
        section, name = key.split(".")
        places = [(key, config[section])] + [
            (f"models.{m}.{key}", model_settings(config, m, section)) for m in config["grid"]["models"]
            if name in config["models"][m].get(section, {})
        ]
        problems += [f"  {where}: the dolly_eval protocol needs {expected!r}, got {values[name]!r}"
                     for where, values in places if values[name] != expected]
    seeds = config["generate"]["seeds"]
    if seeds is None or len(seeds) != DOLLY_EVAL_SEEDS:
        problems.append(f"  generate.seeds: the dolly_eval protocol averages {DOLLY_EVAL_SEEDS} generation seeds, got {seeds!r}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def check_export(config: MutableMapping[str, Any]) -> None:
    """`export.runs` may only name a model of the grid and one of its runs, which some rule can build."""
    from lorastudy.paths import run_name

    grid = config["grid"]
    runs = {run_name(s, r, seed, e) for s in grid["subsets"] for r in grid["ranks"] for seed in grid["seeds"] for e in grid["epochs"]}
    problems = [
        f"  export.runs.{model}: {run!r} is not a run of the grid (grid.models, subsets, ranks, seeds, epochs)"
        for model, run in config["export"]["runs"].items()
        if model not in grid["models"] or run not in runs
    ]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def check_grouped_jobs(config: MutableMapping[str, Any]) -> None:
    """Grouped finetune jobs train on one device: a weight split over several (model_parallel) needs per-run jobs."""
    if config["jobs"] != "grouped":
        return
    problems = [
        f"  {where}.model_parallel: grouped jobs (jobs: grouped) train on one device; "
        "set jobs: per_run to split a model over several GPUs"
        for where, train in _train_sections(config, config["grid"]["models"]) if train.get("model_parallel", 1) > 1
    ]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def check_quantize(config: MutableMapping[str, Any]) -> None:
    """float8 is in the schema's list (it names what was asked for), but Keras cannot train LoRA on a float8 layer."""
    problems = [
        f"  {where}.quantize: float8 cannot train LoRA (Keras's float8 layers have no LoRA path); use int8 or int4"
        for where, train in _train_sections(config, config["models"]) if train.get("quantize") == "float8"
    ]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def check_batch_widths(config: MutableMapping[str, Any]) -> None:
    """Pinned batch widths end at each model's sequence length: records are cut to it, and the widest width holds them."""
    problems = set()
    for model in config["grid"]["models"]:
        train = model_settings(config, model, "train")
        widths = train.get("batch_widths", "auto")
        if widths != "auto" and max(widths) != train["sequence_length"]:
            where = f"models.{model}.train" if "batch_widths" in config["models"][model].get("train", {}) else "train"
            problems.add(f"  {where}.batch_widths: the widest, {max(widths)}, must be the sequence length of {model}, {train['sequence_length']}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(sorted(problems)))


def _train_sections(config: MutableMapping[str, Any], models) -> list[tuple[str, Mapping[str, Any]]]:
    """The train section and each model's overrides of it, with the key each is written under (for error messages)."""
    return [("train", config["train"])] + [(f"models.{m}.train", config["models"][m].get("train", {})) for m in models]


def expand_quantize(config: MutableMapping[str, Any]) -> None:
    """grid.quantize as models: each grid model and mode other than none becomes `<name>_<mode>` on `<name>`'s preset."""
    modes = config["grid"].get("quantize", ["none"])
    grid_models = []
    for name in config["grid"]["models"]:
        spec = config["models"].get(name, {})
        if "base_model" in spec:  # expanded already (the config was checked before)
            grid_models.append(name)
            continue
        grid_models += [name] if "none" in modes else []
        for mode in (m for m in modes if m != "none"):
            derived = f"{name}_{mode}"
            if derived in config["models"] and config["models"][derived].get("base_model") != name:
                raise ConfigError(f"invalid config:\n  grid.quantize: {mode} would name a model {derived}, which models already defines")
            config["models"][derived] = {**_copy(spec), "train": {**spec.get("train", {}), "quantize": mode}, "base_model": name}
            grid_models.append(derived)
    config["grid"]["models"] = list(dict.fromkeys(grid_models))


def check_base_models(config: MutableMapping[str, Any]) -> None:
    """A `base_model` names a model that prepares its own preset."""
    models = config["models"]
    problems = [
        f"  models.{name}.base_model: '{base}' is not a model with a preset of its own"
        for name, spec in models.items()
        if (base := spec.get("base_model")) is not None and (base not in models or "base_model" in models[base])
    ]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def preset_model(config: MutableMapping[str, Any], model: str) -> str:
    """The model whose prepared preset `model` trains and answers on: its base_model, or itself."""
    return config["models"][model].get("base_model", model)


def check_grid(config: MutableMapping[str, Any]) -> None:
    """The grid may only name models and subsets that the config defines."""
    grid = config["grid"]
    problems = [
        f"  grid.models: '{m}' is not defined under models" for m in grid["models"] if m not in config["models"]
    ] + [
        f"  grid.subsets: '{s}' is not defined under data.subsets"
        for s in grid["subsets"]
        if s not in config["data"]["subsets"]
    ]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


# --------------------------------------------------------------------------
# config/README.md: every key, from the schema
# --------------------------------------------------------------------------

KEYS_BEGIN = "<!-- every key: written by `lorastudy config-keys --write config/README.md` from the schema; do not edit -->"
KEYS_END = "<!-- end of every key -->"


def schema_keys(schema: dict[str, Any], path: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) of every property, nested sections and a model's keys included."""
    rows = []
    for name, sub in (schema.get("properties") or {}).items():
        key = f"{path}.{name}" if path else name
        sub = {**schema.get("$defs", {}).get(sub.get("$ref", "").rsplit("/", 1)[-1], {}), **sub}
        rows.append((key, sub.get("default"), " ".join(str(sub.get("description", "")).split())))
        if isinstance(sub.get("additionalProperties"), dict) and "$ref" in sub["additionalProperties"]:
            model = schema["$defs"][sub["additionalProperties"]["$ref"].rsplit("/", 1)[-1]]
            rows += schema_keys({**model, "$defs": schema["$defs"]}, f"{key}.<name>")
        elif sub.get("properties"):
            rows += schema_keys({**sub, "$defs": schema.get("$defs", {})}, key)
    return rows


def keys_markdown(schema: dict[str, Any]) -> str:
    """The table of every key of the config, for config/README.md."""
    def cell(value: Any) -> str:
        return "" if value is None else "`" + json.dumps(value) + "`"

    lines = ["| key | default | what it is |", "| --- | --- | --- |"]
    escape = str.maketrans({"|": "\\|"})
    lines += [f"| `{key}` | {cell(default)} | {text.translate(escape)} |" for key, default, text in schema_keys(schema)]
    return "\n".join([KEYS_BEGIN, "", *lines, "", KEYS_END])


def write_keys(readme: str | os.PathLike, schema_path: str | os.PathLike) -> bool:
    """Replace the generated table in `readme` with the schema's; returns whether it changed."""
    text = open(readme, encoding="utf-8").read()
    head, _, rest = text.partition(KEYS_BEGIN)
    _, _, tail = rest.partition(KEYS_END)
    new = head + keys_markdown(load_schema(schema_path)) + tail
    if new != text:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text

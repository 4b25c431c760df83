"""Gemma shapes for the benchmarks: KerasHub's configurations of the real models, with random weights.

The real weights are out of reach of the GPU machine; a model's cost is its
shape. `hf_config` gives transformers' configuration of the same shape, so
the PyTorch peers run the same model.
"""

from __future__ import annotations

from lorastudy.presets import ARCHITECTURES

# Gemma 2 and 3 with the flags their KerasHub presets set (Gemma 2 is KerasHub's GemmaBackbone).
GEMMA2, GEMMA3 = ARCHITECTURES["gemma2"][1], ARCHITECTURES["gemma3"][1]

KERAS_GEMMA = {
    "gemma_2b": dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
                     hidden_dim=2048, intermediate_dim=32768, head_dim=256),
    "gemma_7b": dict(vocabulary_size=256000, num_layers=28, num_query_heads=16, num_key_value_heads=16,
                     hidden_dim=3072, intermediate_dim=49152, head_dim=256),
    "gemma2_2b": dict(vocabulary_size=256000, num_layers=26, num_query_heads=8, num_key_value_heads=4,
                      hidden_dim=2304, intermediate_dim=18432, head_dim=256, sliding_window_size=4096, **GEMMA2),
    "gemma3_1b": dict(vocabulary_size=262144, num_layers=26, num_query_heads=4, num_key_value_heads=1,
                      hidden_dim=1152, intermediate_dim=6912, head_dim=256, sliding_window_size=512, **GEMMA3),
    "gemma3_4b": dict(vocabulary_size=262144, num_layers=34, num_query_heads=8, num_key_value_heads=4,
                      hidden_dim=2560, intermediate_dim=10240, head_dim=256, sliding_window_size=1024, **GEMMA3),
    # For a dry run of this script on a CPU.
    "gemma_tiny": dict(vocabulary_size=2048, num_layers=2, num_query_heads=2, num_key_value_heads=1,
                       hidden_dim=64, intermediate_dim=128, head_dim=32),
    "gemma3_tiny": dict(vocabulary_size=1000, num_layers=6, num_query_heads=2, num_key_value_heads=1,
                        hidden_dim=64, intermediate_dim=128, head_dim=32, sliding_window_size=16, **GEMMA3),
}


NEWER = ["gemma2_2b", "gemma3_1b", "gemma3_4b"]


LEARNING_RATE, WEIGHT_DECAY = 5e-5, 0.01



def family(model: str) -> str:
    """gemma, gemma2 or gemma3."""
    return model.split("_")[0]



def vocabulary(model: str) -> int:
    return KERAS_GEMMA[model]["vocabulary_size"]



def hf_config(model: str):
    """The same model as transformers configures it (KerasHub's GemmaBackbone, unlike Gemma3Backbone, counts both feed-forward halves)."""
    import transformers

    c = KERAS_GEMMA[model]
    halves = 1 if family(model) == "gemma3" else 2
    common = dict(vocab_size=c["vocabulary_size"], num_hidden_layers=c["num_layers"], num_attention_heads=c["num_query_heads"],
                  num_key_value_heads=c["num_key_value_heads"], hidden_size=c["hidden_dim"],
                  intermediate_size=c["intermediate_dim"] // halves, head_dim=c["head_dim"], max_position_embeddings=8192)
    if family(model) == "gemma":
        return transformers.GemmaConfig(**common, hidden_act="gelu_pytorch_tanh")
    newer = dict(query_pre_attn_scalar=c["head_dim"], sliding_window=c["sliding_window_size"])
    if family(model) == "gemma2":
        return transformers.Gemma2Config(**common, **newer, final_logit_softcapping=c["final_logit_soft_cap"],
                                         attn_logit_softcapping=c["attention_logit_soft_cap"])
    return transformers.Gemma3TextConfig(**common, **newer)



def keras_gemma(model: str, dtype: str):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    prefix = "Gemma3" if family(model) == "gemma3" else "Gemma"
    backbone = getattr(keras_hub.models, f"{prefix}Backbone")(**KERAS_GEMMA[model], dtype=dtype)
    return getattr(keras_hub.models, f"{prefix}CausalLM")(backbone=backbone, preprocessor=None)



def lora_gemma(model: str, rank: int, precision: str = "auto", training: bool = True):
    """The workflow's model set-up: KerasHub Gemma in the study's dtypes, LoRA enabled."""
    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.presets import dtype_policies

    dtype, lora_policy = dtype_policies(precision, training=training)
    causal_lm = keras_gemma(model, dtype)
    enable_lora(causal_lm.backbone, LoraSpec(rank), lora_policy)
    return causal_lm



def random_examples(lengths, vocab: int, seed: int = 0):
    import numpy as np

    from lorastudy.tokens import Example

    rng = np.random.default_rng(seed)
    return [
        Example(i, rng.integers(3, vocab, size=n + 1).astype("int32"), np.ones(n, "float32"), False)
        for i, n in enumerate(lengths)
    ]



def use_attention(kind: str) -> None:
    """`cudnn`: KerasHub's choice on a GPU (cuDNN flash attention); `xla`: its plain einsum-softmax path."""
    if kind == "xla":
        from keras_hub.src.models.gemma import gemma_attention

        gemma_attention.CachedGemmaAttention._use_fused_attention_op = lambda self: False

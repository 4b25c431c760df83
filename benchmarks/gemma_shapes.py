"""Gemma shapes for the benchmarks: KerasHub's configurations of the real models, with random weights.

The real weights are out of reach of the GPU machine; a model's cost is its
shape. `hf_config` gives transformers' configuration of the same shape, so
the PyTorch peers run the same model.
"""

from __future__ import annotations

from lorastudy.presets import ARCHITECTURES

# Gemma 2 and 3 with the flags their KerasHub presets set (Gemma 2 is KerasHub's GemmaBackbone).
GEMMA2, GEMMA3 = ARCHITECTURES["gemma2"][1], ARCHITECTURES["gemma3"][1]
# Gemma 3n E2B as transformers' google/gemma-3n-E2B configures it (its own backbone;
# sizes in Gemma's names, as lorastudy.models.gemma3n_arguments takes them).
GEMMA3N_E2B = {**ARCHITECTURES["gemma3n"][1], "hidden_size_per_layer_input": 256, "laurel_rank": 64, "num_kv_shared_layers": 10}

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
    "gemma3n_e2b": dict(vocabulary_size=262400, num_layers=30, num_query_heads=8, num_key_value_heads=2, hidden_dim=2048,
                        intermediate_dim=16384, head_dim=256, sliding_window_size=512, sliding_window_pattern=5, **GEMMA3N_E2B),
    # For a dry run of this script on a CPU.
    "gemma_tiny": dict(vocabulary_size=2048, num_layers=2, num_query_heads=2, num_key_value_heads=1,
                       hidden_dim=64, intermediate_dim=128, head_dim=32),
    "gemma3_tiny": dict(vocabulary_size=1000, num_layers=6, num_query_heads=2, num_key_value_heads=1,
                        hidden_dim=64, intermediate_dim=128, head_dim=32, sliding_window_size=16, **GEMMA3),
    "gemma3n_tiny": dict(vocabulary_size=1000, num_layers=6, num_query_heads=2, num_key_value_heads=1, hidden_dim=64,
                         intermediate_dim=128, head_dim=32, sliding_window_size=16, sliding_window_pattern=3,
                         **{**GEMMA3N_E2B, "hidden_size_per_layer_input": 16, "laurel_rank": 8, "num_kv_shared_layers": 2}),
}


# Gemma 4 E2B and E4B's text decoders as Google's checkpoints configure them (transformers'
# Gemma4TextConfig's names); KerasHub's own converter gives Gemma4Backbone's arguments of the same shape.
GEMMA4 = dict(vocab_size=262144, vocab_size_per_layer_input=262144, head_dim=256, global_head_dim=512, hidden_size_per_layer_input=256,
              use_double_wide_mlp=True, sliding_window=512, final_logit_softcapping=30.0,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}})
GEMMA4_TEXT = {
    "gemma4_e2b": dict(GEMMA4, num_hidden_layers=35, hidden_size=1536, intermediate_size=6144, num_attention_heads=8,
                       num_key_value_heads=1, num_kv_shared_layers=20, sliding_window_pattern=5),
    "gemma4_e4b": dict(GEMMA4, num_hidden_layers=42, hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
                       num_key_value_heads=2, num_kv_shared_layers=18, sliding_window_pattern=6),
    # The mixture of experts: each layer's dense MLP beside 128 experts, 8 of them used a token; no
    # per-layer embeddings; global layers with 2 KV heads whose keys are their values. KerasHub's preset
    # says only "30-layer, 26B total, 4B active"; these are the GGUF's metadata of the text decoder.
    "gemma4_26b_a4b": dict(GEMMA4, hidden_size_per_layer_input=0, use_double_wide_mlp=False,
                           sliding_window=1024, num_hidden_layers=30, hidden_size=2816, intermediate_size=2112,
                           num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True,
                           num_kv_shared_layers=0, sliding_window_pattern=6, enable_moe_block=True, num_experts=128,
                           top_k_experts=8, moe_intermediate_size=704),
    # For a dry run of this script on a CPU.
    "gemma4_tiny": dict(GEMMA4, vocab_size=1000, vocab_size_per_layer_input=1000, head_dim=32, global_head_dim=64,
                        hidden_size_per_layer_input=16, sliding_window=16, num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                        num_attention_heads=2, num_key_value_heads=1, num_kv_shared_layers=2, sliding_window_pattern=3),
}
GEMMA4_TEXT["gemma4_tiny_moe"] = dict(GEMMA4_TEXT["gemma4_tiny"], hidden_size_per_layer_input=0,
                                      use_double_wide_mlp=False, num_kv_shared_layers=0, num_key_value_heads=2,
                                      num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True, num_experts=8,
                                      top_k_experts=2, moe_intermediate_size=32)
MODELS = [*KERAS_GEMMA, *GEMMA4_TEXT]


NEWER = ["gemma2_2b", "gemma3_1b", "gemma3_4b"]


LEARNING_RATE, WEIGHT_DECAY = 5e-5, 0.01



def family(model: str) -> str:
    """gemma, gemma2, gemma3, gemma3n or gemma4."""
    return model.split("_")[0]


def compute_params(model: str, params: int) -> int:
    """The parameters a token's matrix products use: Gemma 3n and 4's per-layer embeddings are looked up, not multiplied."""
    if family(model) == "gemma4":
        c = GEMMA4_TEXT[model]
        looked_up = c["vocab_size_per_layer_input"] * c["num_hidden_layers"] * c["hidden_size_per_layer_input"]
        # A token's experts are top_k_experts of num_experts (gate, up and down projections each).
        idle_experts = c.get("num_experts", 0) - c.get("top_k_experts", 0) if c.get("enable_moe_block") else 0
        return params - looked_up - c["num_hidden_layers"] * idle_experts * 3 * c["hidden_size"] * (c.get("moe_intermediate_size") or 0)
    if family(model) != "gemma3n":
        return params
    c = KERAS_GEMMA[model]
    return params - c["vocabulary_size"] * c["num_layers"] * c["hidden_size_per_layer_input"]



def vocabulary(model: str) -> int:
    return GEMMA4_TEXT[model]["vocab_size"] if family(model) == "gemma4" else KERAS_GEMMA[model]["vocabulary_size"]



def hf_config(model: str):
    """The same model as transformers configures it (KerasHub's GemmaBackbone, unlike Gemma3Backbone, counts both feed-forward halves)."""
    import transformers

    if family(model) == "gemma4":
        return gemma4_hf_config(model)
    c = KERAS_GEMMA[model]
    if family(model) == "gemma3n":
        return gemma3n_hf_config(model)
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



def gemma4_hf_config(model: str):
    """transformers' Gemma4TextConfig of a GEMMA4_TEXT shape: `sliding_window_pattern - 1` sliding layers, then a global one."""
    import transformers

    c = dict(GEMMA4_TEXT[model])
    pattern = c.pop("sliding_window_pattern")
    layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(c["num_hidden_layers"])]
    return transformers.Gemma4TextConfig(**c, layer_types=layer_types, max_position_embeddings=8192)


def gemma4_backbone_arguments(model: str) -> dict:
    """Gemma4Backbone's arguments for the same shape, by KerasHub's converter of transformers' configs."""
    from keras_hub.src.utils.transformers.convert_gemma4 import convert_backbone_config

    config = gemma4_hf_config(model).to_dict()
    # transformers folds global_head_dim (and the global KV heads) into per_layer_config; Google's config.json,
    # which the converter reads, states them.
    c = GEMMA4_TEXT[model]
    return convert_backbone_config({**config, "global_head_dim": c["global_head_dim"],
                                    "num_global_key_value_heads": c.get("num_global_key_value_heads")})


def gemma3n_backbone_arguments(model: str) -> dict:
    """Gemma3nBackbone's arguments for a Gemma 3n shape of KERAS_GEMMA (given there in Gemma's names)."""
    from lorastudy.models import gemma3n_arguments

    c = KERAS_GEMMA[model]
    return gemma3n_arguments({k: v for k, v in c.items() if k != "vocabulary_size"}, c["vocabulary_size"])


def gemma3n_hf_config(model: str):
    """transformers' Gemma3nTextConfig of the same shape as the KerasHub backbone `keras_gemma` builds."""
    return gemma3n_text_config(gemma3n_backbone_arguments(model))


def gemma3n_text_config(arguments: dict):
    """transformers' Gemma3nTextConfig of the Gemma3nBackbone these arguments build (a backbone's `get_config()` will do).

    The one mapping of KerasHub's names to transformers', shared with the
    tests that hold the PEFT export to transformers' own model.
    """
    import inspect

    import keras_hub
    import transformers

    parameters = inspect.signature(keras_hub.models.Gemma3nBackbone.__init__).parameters.values()
    a = {**{p.name: p.default for p in parameters if p.default is not p.empty}, **arguments}
    # Plain lists: Keras tracks a layer's lists, and transformers deep-copies its config.
    return transformers.Gemma3nTextConfig(
        vocab_size=a["text_vocab_size"], vocab_size_per_layer_input=a["vocab_size_per_layer_input"], hidden_size=a["text_hidden_size"],
        intermediate_size=list(a["intermediate_size"]), num_hidden_layers=a["num_hidden_layers"],
        num_attention_heads=a["num_attention_heads"], num_key_value_heads=a["num_key_value_heads"], head_dim=a["head_dim"],
        layer_types=list(a["layer_types"]), sliding_window=a["sliding_window"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": a["rope_local_base_freq"]},
                         "full_attention": {"rope_type": "default", "rope_theta": a["rope_theta"]}},
        hidden_size_per_layer_input=a["hidden_size_per_layer_input"], altup_num_inputs=a["altup_num_inputs"],
        altup_coef_clip=a["altup_coef_clip"], laurel_rank=a["laurel_rank"], num_kv_shared_layers=a["num_kv_shared_layers"],
        activation_sparsity_pattern=list(a["activation_sparsity_pattern"]), final_logit_softcapping=a["final_logit_soft_cap"],
        max_position_embeddings=8192, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )


def keras_gemma(model: str, dtype: str):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    prefix = {"gemma3": "Gemma3", "gemma3n": "Gemma3n", "gemma4": "Gemma4"}.get(family(model), "Gemma")
    shape = {"Gemma3n": gemma3n_backbone_arguments, "Gemma4": gemma4_backbone_arguments}.get(prefix, KERAS_GEMMA.get)(model)
    backbone = getattr(keras_hub.models, f"{prefix}Backbone")(**shape, dtype=dtype)
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

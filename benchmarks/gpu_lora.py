"""LoRA fine-tuning and generation on one GPU: this workflow's code against transformers + PEFT.

    python benchmarks/gpu_lora.py run --phases train,generate,... --out DIR

Every measurement runs in a process of its own (JAX and PyTorch never share
the GPU, and each peak is its own) and appends one JSON line to
DIR/results.jsonl. Random weights with the real architectures (KerasHub's
configurations of Gemma 2B and 7B, Gemma 2 2B, Gemma 3 1B and 4B), since the
real weights are out of reach here (benchmarks/real_270m.py runs the one real
checkpoint there is).

Ours is the workflow's own code: `lorastudy.finetune.compile_for_training`
(KerasHub's CausalLM layers, `enable_lora`, AdamW, masked cross-entropy,
Keras `fit` on JAX) fed by the finetune stage's batches, and
`lorastudy.generate.Generator` (KerasHub's compiled generation loop). The
peer is what a user would otherwise pick: transformers' Gemma (Gemma2, Gemma3
text) causal LM in bfloat16 with PEFT LoRA on q_proj and v_proj, torch's AdamW with the same
settings, the same shapes, eager PyTorch, `model.generate` for generation.

Throughput counts tokens of the batch (all real tokens, no padding, in the
training grid). MFU = tokens/s x 4 x parameters / 989 TFLOP/s (H100 SXM dense
bfloat16): with the base frozen, a token costs a forward pass (2 x parameters
FLOPs, the tied embedding counted as the output projection) and the backward
pass to the activations (as much again); LoRA's own FLOPs and attention's
quadratic term are left out, as in the usual convention.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
import lorastudy  # noqa: E402, F401 - JAX as Keras's backend, and a quiet start, before any keras import
from lorastudy.presets import ARCHITECTURES  # noqa: E402

PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}
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


LEARNING_RATE, WEIGHT_DECAY = 5e-5, 0.01


def emit(out: Path, **record) -> None:
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    line = json.dumps(record)
    print("RESULT", line, flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def peak_flops() -> float:
    name = gpu_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), float("nan"))


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory", "Out of memory"))


# --------------------------------------------------------------------------
# ours (JAX, the workflow's code)
# --------------------------------------------------------------------------


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


def jax_peak() -> int | None:
    import jax

    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def use_attention(kind: str) -> None:
    """`cudnn`: KerasHub's choice on a GPU (cuDNN flash attention); `xla`: its plain einsum-softmax path."""
    if kind == "xla":
        from keras_hub.src.models.gemma import gemma_attention

        gemma_attention.CachedGemmaAttention._use_fused_attention_op = lambda self: False


def ours_train(args, causal_lm=None) -> None:
    """Training steps at each shape; `causal_lm`: a model with LoRA enabled (default: random weights of args.model)."""
    from lorastudy.finetune import TrainSettings, compile_for_training
    from lorastudy.tokens import training_batches

    out = Path(args.out)
    use_attention(args.attention)
    causal_lm = causal_lm or lora_gemma(args.model, args.rank, args.precision)
    params = causal_lm.backbone.count_params()
    Batches = training_batches()
    # Ascending in tokens per batch, so the process's peak memory after each
    # shape is that shape's peak.
    shapes = sorted((tuple(map(int, s.split("x"))) for s in args.shapes), key=lambda s: s[0] * s[1])
    for seq, batch in shapes:
        settings = TrainSettings(sequence_length=seq, batch_size=batch, length_bucketing=False,
                                 learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        data = Batches(random_examples([seq] * batch * (args.steps + 3), causal_lm.backbone.vocabulary_size), [seq], batch, 0)
        record = dict(phase="train", framework="ours", model=args.model, precision=args.precision, rank=args.rank,
                      seq=seq, batch=batch, params=params, attention=args.attention,
                      xla_flags=os.environ.get("XLA_FLAGS", ""), gpu=gpu_name())
        try:
            model = compile_for_training(causal_lm, settings, total_steps=len(data))
            started = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
            compile_s = time.perf_counter() - started
            started = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=args.steps, verbose=0)
            seconds = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - a shape that does not fit is a result
            emit(out, **record, fits=False, error=f"{type(error).__name__}: {str(error)[:300]}", oom=is_oom(error))
            if is_oom(error):
                break
            raise
        tokens_per_s = seq * batch * args.steps / seconds
        emit(out, **record, fits=True, compile_s=compile_s, step_ms=1000 * seconds / args.steps,
             tokens_per_s=tokens_per_s, mfu=tokens_per_s * 4 * params / peak_flops(), peak_bytes=jax_peak())


def ours_profile(args) -> None:
    """A JAX profiler trace of a few training steps, and its GPU kernels summed by name."""
    import gzip

    import jax

    from lorastudy.finetune import TrainSettings, compile_for_training
    from lorastudy.tokens import training_batches

    out = Path(args.out)
    causal_lm = lora_gemma(args.model, args.rank, args.precision)
    seq, batch = map(int, args.shapes[0].split("x"))
    settings = TrainSettings(sequence_length=seq, batch_size=batch, length_bucketing=False,
                             learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    data = training_batches()(random_examples([seq] * batch * 20, vocabulary(args.model)), [seq], batch, 0)
    model = compile_for_training(causal_lm, settings, total_steps=len(data))
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
    trace_dir = out / f"profile_{args.model}_{seq}x{batch}"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        model.fit(data, epochs=1, steps_per_epoch=args.steps, verbose=0)
    trace_file = next(trace_dir.rglob("perfetto_trace.json.gz"))
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    kernels: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and "GPU" in processes.get(e.get("pid"), "") and "dur" in e:
            kernels[e["name"]] = kernels.get(e["name"], 0.0) + e["dur"]
    total = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:60]
    emit(out, phase="profile", framework="ours", model=args.model, seq=seq, batch=batch, rank=args.rank, steps=args.steps,
         gpu_busy_ms_per_step=total / 1000 / args.steps, processes=sorted(set(processes.values())),
         top_kernels=[dict(name=n[:160], ms_per_step=d / 1000 / args.steps, share=d / total) for n, d in top])


def ours_generate(args) -> None:
    import numpy as np

    from lorastudy.generate import GenerateSettings, Generator, make_sampler

    out = Path(args.out)
    causal_lm = lora_gemma(args.model, 4, training=False)
    causal_lm.compile(sampler=make_sampler(GenerateSettings()))
    rng = np.random.default_rng(0)
    for batch in args.batches:
        settings = GenerateSettings(batch_size=batch, max_new_tokens=args.new_tokens)
        # End token -1 never occurs: every row generates all its new tokens, as
        # transformers does with min_new_tokens (random weights would stop at random).
        generator = Generator(causal_lm, settings, stop_token_ids=(-1,), pad_token_id=0)
        prompts = [rng.integers(3, vocabulary(args.model), size=args.prompt_tokens).tolist() for _ in range(batch)]
        outputs, compile_s, seconds = timed_twice(generator, prompts)
        new = sum(len(o["new_ids"]) for o in outputs)
        emit(out, phase="generate", framework="ours", model=args.model, batch=batch, prompt_tokens=args.prompt_tokens,
             new_tokens=new, seconds=seconds, compile_s=compile_s, new_tokens_per_s=new / seconds, peak_bytes=jax_peak(), gpu=gpu_name())


def timed_twice(generator, prompts):
    """A first call that compiles, then the timed one: (its outputs, first call's seconds, timed seconds)."""
    started = time.perf_counter()
    generator(prompts)
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    outputs = generator(prompts)
    return outputs, compile_s, time.perf_counter() - started


def dolly_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts shaped like Dolly's no-context records (prompt ~25 tokens, long-tailed responses)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.normal(28, 10, n), 12, None)
    response = rng.lognormal(np.log(60), 0.9, n)
    return [int(min(256, p + r)) for p, r in zip(prompt, response)]


def ours_bucketing(args) -> None:
    import keras

    from lorastudy.finetune import TrainSettings, bucket_widths, compile_for_training
    from lorastudy.tokens import training_batches

    out = Path(args.out)
    causal_lm = lora_gemma(args.model, args.rank)
    lengths = dolly_like_lengths(args.examples)
    examples = random_examples(lengths, vocabulary(args.model))
    Batches = training_batches()

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.started

    for bucketing, multiple in [(False, 256), (True, 64), (True, 32), (True, 16)]:
        # Every width that saves padding: compilation is not weighed here, it is measured.
        settings = TrainSettings(sequence_length=256, batch_size=args.batch, length_bucketing=bucketing, pad_multiple=multiple,
                                 learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, compile_seconds_per_width=0)
        widths = bucket_widths(settings, examples, examples, epochs=2)
        data = Batches(examples, widths, args.batch, 0, seed=0)
        model = compile_for_training(causal_lm, settings, total_steps=2 * len(data))
        timer = EpochTimer()
        model.fit(data, epochs=1, verbose=0, callbacks=[timer])  # compiles every bucket width
        first_epoch_s = timer.seconds
        model.fit(data, epochs=1, verbose=0, callbacks=[timer])
        emit(out, phase="bucketing", framework="ours", model=args.model, rank=args.rank, batch=args.batch,
             length_bucketing=bucketing, pad_multiple=multiple, examples=len(examples), useful_tokens=sum(lengths),
             padded_tokens=data.padded_tokens(), widths=len(widths),
             first_epoch_seconds=first_epoch_s, seconds=timer.seconds, useful_tokens_per_s=sum(lengths) / timer.seconds, gpu=gpu_name())


def ours_eval(args) -> None:
    """The whole test-split evaluation of one run: 500 Dolly-length prompts, the workflow's batch size."""
    from lorastudy.generate import GenerateSettings, Generator, make_sampler

    out = Path(args.out)
    causal_lm = lora_gemma(args.model, 4, training=False)
    settings = GenerateSettings(batch_size=args.batch, max_new_tokens=128)
    causal_lm.compile(sampler=make_sampler(settings))
    import numpy as np

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, vocabulary(args.model), size=int(n)).tolist() for n in np.clip(rng.normal(28, 10, 500), 12, 120)]
    started = time.perf_counter()
    outputs = Generator(causal_lm, settings, stop_token_ids=(1,), pad_token_id=0)(prompts)
    seconds = time.perf_counter() - started
    emit(out, phase="eval500", framework="ours", model=args.model, batch=args.batch, prompts=len(prompts),
         new_tokens=sum(len(o["new_ids"]) for o in outputs), seconds_including_compilation=seconds, peak_bytes=jax_peak(), gpu=gpu_name())


# --------------------------------------------------------------------------
# the peer: transformers + PEFT on PyTorch
# --------------------------------------------------------------------------


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# The PyTorch routes a speed-minded user picks (issue 18): eager PEFT; one line
# of torch.compile; Liger's Triton kernels (RoPE, RMSNorm, GeGLU, fused linear
# cross-entropy); both. For generation: eager, or transformers' static KV
# cache with the forward pass compiled, as its documentation recommends.
PEERS = {"train": ["eager", "compile", "liger", "liger+compile"], "generate": ["eager", "static+compile"]}


def peft_model(model: str, rank: int, peer: str = "eager"):
    import peft
    import torch
    import transformers

    if "liger" in peer:
        from liger_kernel import transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{family(model)}")()
    torch.manual_seed(0)
    with torch.device(torch_device()):
        base = transformers.AutoModelForCausalLM.from_config(hf_config(model)).to(torch.bfloat16)
    lora = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)


def framework(peer: str) -> str:
    return "peft" if peer == "eager" else f"peft+{peer}"


def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_peak(reset: bool = False) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def peft_train(args, model=None) -> None:
    """The peer's training steps at each shape; `model`: a PEFT model (default: random weights of args.model)."""
    import torch

    out = Path(args.out)
    peer = getattr(args, "peer", "eager")
    model = model or peft_model(args.model, args.rank, peer)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    model.train()
    forward = torch.compile(model) if "compile" in peer else model
    shapes = sorted((tuple(map(int, s.split("x"))) for s in args.shapes), key=lambda s: s[0] * s[1])
    for seq, batch in shapes:
        record = dict(phase="train", framework=framework(peer), model=args.model, precision="bfloat16", rank=args.rank,
                      seq=seq, batch=batch, params=params, gpu=gpu_name())
        torch_peak(reset=True)
        tokens = torch.randint(3, model.config.vocab_size, (batch, seq + 1), device=torch_device())

        def step():
            loss = forward(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            started = time.perf_counter()
            for _ in range(3):
                step()
            torch_sync()
            warmup_s = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch_sync()
            seconds = time.perf_counter() - started
        except torch.OutOfMemoryError as error:
            emit(out, **record, fits=False, oom=True, error=str(error)[:300])
            break
        tokens_per_s = seq * batch * args.steps / seconds
        emit(out, **record, fits=True, compile_s=warmup_s, step_ms=1000 * seconds / args.steps, tokens_per_s=tokens_per_s,
             mfu=tokens_per_s * 4 * params / peak_flops(), peak_bytes=torch_peak())


def peft_generate(args) -> None:
    import torch

    out = Path(args.out)
    model = peft_model(args.model, 4).eval()
    for batch in args.batches:
        torch_peak(reset=True)
        prompts = torch.randint(3, vocabulary(args.model), (batch, args.prompt_tokens), device=torch_device())
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones_like(prompts))
        if args.peer == "static+compile":
            # With a static cache, transformers compiles the decoding step itself (its
            # generation_config.compile_config); compiling forward by hand with CUDA
            # graphs broke on the second call here (outputs overwritten).
            kwargs["cache_implementation"] = "static"
        with torch.no_grad():
            started = time.perf_counter()
            model.generate(input_ids=prompts, **kwargs)
            torch_sync()
            warmup_s = time.perf_counter() - started
            started = time.perf_counter()
            output = model.generate(input_ids=prompts, **kwargs)
            torch_sync()
            seconds = time.perf_counter() - started
        new = (output.shape[1] - args.prompt_tokens) * batch
        emit(out, phase="generate", framework=framework(args.peer), model=args.model, batch=batch, prompt_tokens=args.prompt_tokens,
             new_tokens=new, seconds=seconds, compile_s=warmup_s, new_tokens_per_s=new / seconds,
             peak_bytes=torch_peak(), gpu=gpu_name())


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------

GRID_SHAPES = ["256x1", "256x8", "256x32", "512x1", "512x8", "512x32"]
PHASES = {
    "train_ours": lambda m, ranks: [["ours-train", "--model", m, "--rank", str(r), "--shapes", *GRID_SHAPES] for r in ranks],
    "train_peft": lambda m, ranks: [["peft-train", "--model", m, "--rank", str(r), "--shapes", *GRID_SHAPES] for r in ranks],
    "variants": lambda m, ranks: [
        ["ours-train", "--model", m, "--rank", "4", "--shapes", "256x8", "512x8", "256x32", "--attention", a, f"--xla-flags={f}"]
        for a, f in [("xla", ""), ("cudnn", "--xla_gpu_enable_triton_gemm=false"), ("xla", "--xla_gpu_enable_triton_gemm=false")]
    ],
    "profile": lambda m, ranks: [["ours-profile", "--model", m, "--rank", "4", "--shapes", "512x8", "--steps", "5"]],
    "train_mixed": lambda m, ranks: [["ours-train", "--model", m, "--rank", "4", "--precision", "mixed_bfloat16", "--shapes", "512x8"]],
    "generate_ours": lambda m, ranks: [["ours-generate", "--model", m]],
    "generate_peft": lambda m, ranks: [["peft-generate", "--model", m]],
    "bucketing": lambda m, ranks: [["ours-bucketing", "--model", m]],
    "eval500": lambda m, ranks: [["ours-eval", "--model", m]],
    "train_7b": lambda m, ranks: [["ours-train", "--model", "gemma_7b", "--rank", "4", "--shapes", "256x8"]],
    "train_7b_peft": lambda m, ranks: [["peft-train", "--model", "gemma_7b", "--rank", "4", "--shapes", "256x8"]],
    # Gemma 2 and 3 shapes (issue 16): the study's two training shapes and two generation batches.
    "newer_train": lambda m, ranks: [
        [w, "--model", n, "--rank", "4", "--shapes", "256x8", "512x8"] for n in NEWER for w in ("ours-train", "peft-train")
    ],
    # The strongest PyTorch routes (issue 18), against ours at the same shapes.
    "peers_train": lambda m, ranks: [
        ["ours-train", "--model", m, "--rank", "4", "--shapes", "256x8", "512x8"],
        *[["peft-train", "--model", m, "--rank", "4", "--shapes", "256x8", "512x8", "--peer", p] for p in PEERS["train"]],
    ],
    "peers_generate": lambda m, ranks: [
        ["ours-generate", "--model", m, "--batches", "16", "64"],
        *[["peft-generate", "--model", m, "--batches", "16", "64", "--peer", p] for p in PEERS["generate"]],
    ],
    "gemma3_train": lambda m, ranks: [["ours-train", "--model", n, "--rank", "4", "--shapes", "256x8", "512x8"] for n in NEWER[1:]],
    "newer_generate": lambda m, ranks: [[w, "--model", n, "--batches", "16", "64"] for n in NEWER for w in ("ours-generate", "peft-generate")],
}


def software() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("jax", "jaxlib", "keras", "keras-hub", "torch", "transformers", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    driver = ""
    if gpu_name() != "unknown":
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    emit(out, phase="environment", gpu=gpu_name(), driver=driver, python=sys.version.split()[0], software=software(), phases=args.phases)
    for phase in args.phases:
        for worker in PHASES[phase](args.model, args.ranks):
            run_worker([__file__, *worker, "--out", str(out), *(["--steps", str(args.steps)] if "train" in worker[0] else [])], out)


def run_worker(arguments: list[str], out: Path, timeout: float | None = None, **env) -> tuple[subprocess.CompletedProcess, float]:
    """One measurement in a Python process of its own (its own GPU memory and peak); its output goes to out/workers.log.

    Returns the finished process and its wall seconds, start to exit. A
    process still running after `timeout` seconds is killed and returns 124
    with what it had printed."""
    command = [sys.executable, *arguments]
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92", "PYTHONUNBUFFERED": "1", **env}
    print("+", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as killed:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        done = subprocess.CompletedProcess(command, 124, text(killed.stdout), text(killed.stderr) + f"\nkilled after {timeout} s\n")
    seconds = time.perf_counter() - started
    (out / "workers.log").open("a").write(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}\n")
    print(f"  exit {done.returncode} after {seconds:.0f} s", flush=True)
    if done.returncode:
        print(done.stderr[-3000:], flush=True)
    return done, seconds


def load(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        run_env = None
        for line in open(path):
            record = json.loads(line)
            if record["phase"] == "environment":
                run_env = record
            else:
                records.append({**record, "run": Path(path).stem, "environment": run_env})
    return records


def pair(records, phase, key):
    """Ours and the peer's record for each setting, both from the same run."""
    rows = {}
    for r in records:
        # The variants (other attention, XLA flags) are reported apart.
        if r["phase"] == phase and r.get("attention", "cudnn") == "cudnn" and not r.get("xla_flags"):
            rows.setdefault((r["run"], *key(r)), {})[r["framework"]] = r
    return rows


def summarize(args) -> None:
    """benchmarks/results/: the records as CSV and JSON, and the README's markdown tables."""
    records = load(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    environments = {r["run"]: r["environment"] for r in records}
    (out / "gpu_lora.json").write_text(json.dumps({"environments": environments, "records": [
        {k: v for k, v in r.items() if k != "environment"} for r in records]}, indent=1) + "\n")
    lines = ["| model | rank | seq x batch | ours tokens/s | ours MFU | ours peak GiB | PEFT tokens/s | PEFT peak GiB | ours / PEFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = []
    for key, both in sorted(pair(records, "train", lambda r: (r["model"], r["rank"], r["seq"] * 1000 + r["batch"])).items()):
        ours, peft = both.get("ours"), both.get("peft")
        if not ours:
            continue
        row = dict(run=key[0], model=ours["model"], rank=ours["rank"], seq=ours["seq"], batch=ours["batch"],
                   ours_tokens_per_s=ours.get("tokens_per_s"), ours_step_ms=ours.get("step_ms"), ours_compile_s=ours.get("compile_s"),
                   ours_mfu=ours.get("mfu"), ours_peak_gib=(ours.get("peak_bytes") or 0) / 2**30,
                   peft_tokens_per_s=(peft or {}).get("tokens_per_s"), peft_step_ms=(peft or {}).get("step_ms"),
                   peft_peak_gib=((peft or {}).get("peak_bytes") or 0) / 2**30, peft_fits=(peft or {}).get("fits"))
        row["ratio"] = row["ours_tokens_per_s"] / row["peft_tokens_per_s"] if row["peft_tokens_per_s"] else None
        table.append(row)
        peft_cell = f"{row['peft_tokens_per_s']:,.0f}" if row["peft_tokens_per_s"] else "out of memory"
        lines.append(f"| {row['model']} | {row['rank']} | {row['seq']} x {row['batch']} | {row['ours_tokens_per_s']:,.0f} | "
                     f"{100 * row['ours_mfu']:.1f}% | {row['ours_peak_gib']:.1f} | {peft_cell} | "
                     + (f"{row['peft_peak_gib']:.1f} | {row['ratio']:.2f}x |" if row["ratio"] else "- | - |"))
    write_csv(out / "gpu_lora_train.csv", table)
    lines += ["", "| model | new tokens at batch | ours new tokens/s | PEFT new tokens/s | ours / PEFT | ours peak GiB |", "|---|---|---|---|---|---|"]
    table = []
    for key, both in sorted(pair(records, "generate", lambda r: (r["model"], r["batch"])).items()):
        ours, peft = both["ours"], both["peft"]
        row = dict(run=key[0], model=ours["model"], batch=ours["batch"], prompt_tokens=ours["prompt_tokens"],
                   new_tokens=ours["new_tokens"], ours_new_tokens_per_s=ours["new_tokens_per_s"], ours_compile_s=ours["compile_s"],
                   peft_new_tokens_per_s=peft["new_tokens_per_s"], ratio=ours["new_tokens_per_s"] / peft["new_tokens_per_s"],
                   ours_peak_gib=ours["peak_bytes"] / 2**30, peft_peak_gib=peft["peak_bytes"] / 2**30)
        table.append(row)
        lines.append(f"| {row['model']} | {row['new_tokens'] // row['batch']} at {row['batch']} | {row['ours_new_tokens_per_s']:,.0f} | "
                     f"{row['peft_new_tokens_per_s']:,.0f} | {row['ratio']:.1f}x | {row['ours_peak_gib']:.1f} |")
    write_csv(out / "gpu_lora_generate.csv", table)
    lines += ["", "| batching | bucket widths | padded tokens | useful tokens/s | vs padded | first epoch s (compiles) |", "|---|---|---|---|---|---|"]
    table = [r for r in records if r["phase"] == "bucketing"]
    plain = next(r for r in table if not r["length_bucketing"])
    for r in table:
        name = f"buckets of {r['pad_multiple']}" if r["length_bucketing"] else "padded to 256"
        lines.append(f"| {name} | {r['widths']} | {r['padded_tokens']:,} | {r['useful_tokens_per_s']:,.0f} | "
                     f"{r['useful_tokens_per_s'] / plain['useful_tokens_per_s']:.2f}x | {r['first_epoch_seconds']:.0f} |")
    write_csv(out / "gpu_lora_bucketing.csv", [{k: v for k, v in r.items() if k != "environment"} for r in table])
    for r in records:
        if r["phase"] == "profile":
            lines += ["", f"GPU time of one training step, {r['model']} rank {r['rank']}, {r['seq']} x {r['batch']} "
                      f"(JAX profiler, {r['gpu_busy_ms_per_step']:.1f} ms busy per step):", "",
                      "| kernels | ms per step | share |", "|---|---|---|"]
            for group, ms in kernel_groups(r["top_kernels"]).items():
                lines.append(f"| {group} | {ms:.1f} | {100 * ms / r['gpu_busy_ms_per_step']:.0f}% |")
    lines += peer_lines(records, out)
    (out / "gpu_lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def peer_lines(records, out: Path) -> list[str]:
    """Ours against every PyTorch route measured in the same run, and the ratio to the strongest (issue 18)."""
    groups: dict[tuple, dict] = {}
    for r in records:
        if r["phase"] in ("train", "generate") and r.get("fits", True) and not r.get("xla_flags") and r.get("attention", "cudnn") == "cudnn":
            shape = f"{r['seq']} x {r['batch']}" if r["phase"] == "train" else f"batch {r['batch']}"
            groups.setdefault((r["run"], r["phase"], r["model"], shape), {})[r["framework"]] = r
    table = []
    for (run, phase, model, shape), by in sorted(groups.items()):
        peers = {f: r for f, r in by.items() if f.startswith("peft+")}
        if "ours" not in by or not peers:
            continue
        key = "tokens_per_s" if phase == "train" else "new_tokens_per_s"
        peers["peft"] = by.get("peft", {key: 0})
        strongest = max(peers, key=lambda f: peers[f][key])
        table.append(dict(run=run, phase=phase, model=model, shape=shape, ours=by["ours"][key],
                          **{f: peers[f][key] for f in sorted(peers)}, strongest=strongest,
                          strongest_compile_s=peers[strongest].get("compile_s"),
                          ratio=by["ours"][key] / peers[strongest][key]))
    if not table:
        return []
    write_csv(out / "gpu_lora_peers.csv", table)
    lines = []
    for phase in ("train", "generate"):
        rows = [row for row in table if row["phase"] == phase]
        names = sorted({k for row in rows for k in row if k.startswith("peft")}, key=len)
        if not rows:
            continue
        unit = "tokens/s" if phase == "train" else "new tokens/s"
        lines += ["", f"| {phase} {unit} | shape | ours | " + " | ".join(names) + " | ours / strongest |",
                  "|---|---|---|" + "---|" * len(names) + "---|"]
        for row in rows:
            lines.append(f"| {row['model']} | {row['shape']} | {row['ours']:,.0f} | "
                         + " | ".join(f"{row[n]:,.0f}" if row.get(n) else "-" for n in names)
                         + f" | {row['ratio']:.2f}x ({row['strongest']}) |")
    return lines


def kernel_groups(kernels: list[dict]) -> dict[str, float]:
    """A profile's kernels by kind (XLA names fusions by their root op; identical fusions share a kernel)."""
    groups: dict[str, float] = {}
    for k in kernels:
        name = k["name"]
        if "nvjet" in name or "gemm" in name or "cutlass" in name:
            group = "matrix multiplications (cuBLAS, Triton)"
        elif "cudnn" in name or "sdpa" in name:
            group = "attention (cuDNN flash)"
        elif "reduce" in name:
            group = "reductions (norms, softmax, loss)"
        else:
            group = "elementwise (GeLU, casts, residuals)"
        groups[group] = groups.get(group, 0.0) + k["ms_per_step"]
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--phases", nargs="+", choices=list(PHASES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="gemma_2b", choices=list(KERAS_GEMMA))
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16], help="LoRA ranks of the training grid")
    for name, fn in [("ours-train", ours_train), ("peft-train", peft_train), ("ours-profile", ours_profile)]:
        w = sub.add_parser(name)
        w.set_defaults(fn=fn)
        w.add_argument("--model", default="gemma_2b")
        w.add_argument("--rank", type=int, default=4)
        w.add_argument("--shapes", nargs="+", default=GRID_SHAPES, help="SEQxBATCH")
        w.add_argument("--steps", type=int, default=20)
        w.add_argument("--precision", default="auto")
        w.add_argument("--attention", default="cudnn", choices=["cudnn", "xla"])
        w.add_argument("--xla-flags", default="", help="set as XLA_FLAGS before JAX starts")
        w.add_argument("--peer", default="eager", choices=PEERS["train"], help="the PyTorch route (peft-train)")
        w.add_argument("--out", required=True)
    for name, fn in [("ours-generate", ours_generate), ("peft-generate", peft_generate)]:
        w = sub.add_parser(name)
        w.set_defaults(fn=fn)
        w.add_argument("--model", default="gemma_2b")
        w.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
        w.add_argument("--prompt-tokens", type=int, default=64)
        w.add_argument("--new-tokens", type=int, default=128)
        w.add_argument("--peer", default="eager", choices=PEERS["generate"], help="the PyTorch route (peft-generate)")
        w.add_argument("--out", required=True)
    w = sub.add_parser("ours-bucketing")
    w.set_defaults(fn=ours_bucketing)
    w.add_argument("--model", default="gemma_2b")
    w.add_argument("--rank", type=int, default=4)
    w.add_argument("--batch", type=int, default=8)
    w.add_argument("--examples", type=int, default=512)
    w.add_argument("--out", required=True)
    w = sub.add_parser("ours-eval")
    w.set_defaults(fn=ours_eval)
    w.add_argument("--model", default="gemma_2b")
    w.add_argument("--batch", type=int, default=16)
    w.add_argument("--out", required=True)
    p = sub.add_parser("summarize")
    p.add_argument("--results", nargs="+", required=True, help="results.jsonl files of runs")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if getattr(args, "xla_flags", ""):
        os.environ["XLA_FLAGS"] = args.xla_flags
    if args.command == "run":
        run(args)
    elif args.command == "summarize":
        summarize(args)
    else:
        args.fn(args)


if __name__ == "__main__":
    main()

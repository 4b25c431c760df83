"""LoRA fine-tuning and generation on one GPU: this workflow's code against transformers + PEFT.

    python -m benchmarks.gpu_lora run --phases train,generate,... --out DIR

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

import lorastudy  # noqa: F401 - JAX as Keras's backend, and a quiet start, before any keras import
from benchmarks.gemma_shapes import (
    LEARNING_RATE, MODELS, NEWER, WEIGHT_DECAY, compute_params, lora_gemma, random_examples, use_attention, vocabulary,
)
from benchmarks.peft_peer import PEERS, peft_generate, peft_train
from benchmarks.gpu_lora_summary import summarize
from benchmarks.harness import dolly_like_lengths, emit, gpu_name, is_oom, jax_peak, peak_flops, run_worker, software


# --------------------------------------------------------------------------
# ours (JAX, the workflow's code)
# --------------------------------------------------------------------------


def ours_train(args, causal_lm=None) -> None:
    """Training steps at each shape; `causal_lm`: a model with LoRA enabled (default: random weights of args.model)."""
    from lorastudy.training import TrainSettings, compile_for_training
    from lorastudy.finetune import Batches

    out = Path(args.out)
    use_attention(args.attention)
    causal_lm = causal_lm or lora_gemma(args.model, args.rank, args.precision)
    params = compute_params(args.model, causal_lm.backbone.count_params())
    # Ascending in tokens per batch, so the process's peak memory after each
    # shape is that shape's peak.
    shapes = sorted((tuple(map(int, s.split("x"))) for s in args.shapes), key=lambda s: s[0] * s[1])
    for seq, batch in shapes:
        settings = TrainSettings(sequence_length=seq, batch_size=batch, length_bucketing=False,
                                 learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        data = Batches(random_examples([seq] * batch * (args.steps + 3), vocabulary(args.model)), [seq], batch, 0)
        record = dict(phase="train", framework="ours", model=args.model, precision=args.precision, rank=args.rank,
                      seq=seq, batch=batch, params=params, attention=args.attention,
                      xla_flags=os.environ.get("XLA_FLAGS", ""), gpu=gpu_name())
        try:
            model = compile_for_training(causal_lm, settings, total_steps=len(data))
            started = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
            synced(model)
            compile_s = time.perf_counter() - started
            started = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=args.steps, verbose=0)
            synced(model)
            seconds = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - a shape that does not fit is a result
            emit(out, **record, fits=False, error=f"{type(error).__name__}: {str(error)[:300]}", oom=is_oom(error))
            if is_oom(error):
                break
            raise
        tokens_per_s = seq * batch * args.steps / seconds
        emit(out, **record, fits=True, compile_s=compile_s, step_ms=1000 * seconds / args.steps,
             tokens_per_s=tokens_per_s, mfu=tokens_per_s * 4 * params / peak_flops(), peak_bytes=jax_peak())


def synced(model) -> None:
    """Wait for the steps' results: a step that failed on the device (out of memory under a cap) raises here, not never.

    Keras's `fit` on JAX returns once the steps are dispatched; a step whose
    buffers cannot be allocated fails asynchronously, and without this its
    shape would be timed at the speed of doing nothing.
    """
    import jax

    jax.block_until_ready([v.value for v in model.trainable_variables])


def ours_profile(args) -> None:
    """A JAX profiler trace of a few training steps, and its GPU kernels summed by name."""
    import gzip

    import jax

    from lorastudy.training import TrainSettings, compile_for_training
    from lorastudy.finetune import Batches

    out = Path(args.out)
    causal_lm = lora_gemma(args.model, args.rank, args.precision)
    seq, batch = map(int, args.shapes[0].split("x"))
    settings = TrainSettings(sequence_length=seq, batch_size=batch, length_bucketing=False,
                             learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    data = Batches(random_examples([seq] * batch * 20, vocabulary(args.model)), [seq], batch, 0)
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


def ours_bucketing(args) -> None:
    import keras

    from lorastudy.training import TrainSettings, bucket_widths, compile_for_training
    from lorastudy.finetune import Batches

    out = Path(args.out)
    causal_lm = lora_gemma(args.model, args.rank)
    lengths = dolly_like_lengths(args.examples)
    examples = random_examples(lengths, vocabulary(args.model))

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
    # Gemma 3n (issue 26; run with --model gemma3n_e2b): training against eager PEFT and PEFT compiled
    # (the strongest route for Gemma 2B), generation against eager and static-cache compiled.
    "gemma3n": lambda m, ranks: [
        ["ours-train", "--model", m, "--rank", "4", "--shapes", "256x8", "512x8"],
        *[["peft-train", "--model", m, "--rank", "4", "--shapes", "256x8", "512x8", "--peer", p] for p in ("eager", "compile")],
        *PHASES["generate_vs_peft"](m, ranks),
    ],
    # Its generation rows alone (run with --model gemma4_e4b for the rows the Gemma 4 run lacked).
    "generate_vs_peft": lambda m, ranks: [
        ["ours-generate", "--model", m, "--batches", "16", "64"],
        *[["peft-generate", "--model", m, "--batches", "16", "64", "--peer", p] for p in PEERS["generate"]],
    ],
    # Gemma 4 E2B and E4B (issue 26): the Gemma 3n phase for both shapes, the training rows first.
    "gemma4": lambda m, ranks: sorted((w for n in ("gemma4_e2b", "gemma4_e4b") for w in PHASES["gemma3n"](n, ranks)),
                                      key=lambda w: "generate" in w[0]),
    "gemma3_train": lambda m, ranks: [["ours-train", "--model", n, "--rank", "4", "--shapes", "256x8", "512x8"] for n in NEWER[1:]],
    "newer_generate": lambda m, ranks: [[w, "--model", n, "--batches", "16", "64"] for n in NEWER for w in ("ours-generate", "peft-generate")],
}


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
            run_worker("benchmarks.gpu_lora", [*worker, "--out", str(out), *(["--steps", str(args.steps)] if "train" in worker[0] else [])], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--phases", nargs="+", choices=list(PHASES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="gemma_2b", choices=MODELS)
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

"""Where a grouped finetune job's training step loses time on a GPU: the same step, taken apart.

    python -m benchmarks.grouped_step run --model gemma_2b --shape 256x4 --steps 40 --out DIR
    python -m benchmarks.grouped_step summarize --results [benchmarks/results/grouped_step.json] DIR/results.jsonl

The mini grid's grouped job trained at about half the tokens/s that Keras
`fit` reaches at the same shape (benchmarks/gpu_lora.py). Each variant here
changes one thing between the two, on one model in one process (random
weights of the named shape, LoRA rank 4 on the study's targets), and emits
its steady ms per step and tokens/s:

- `fit`: Keras `fit` on `compile_for_training` (cuDNN attention where KerasHub picks it);
- `run_fused` / `run_xla`: the grouped trainer's own step for one adapter
  (`stacked_step.run_steps`), jitted without `vmap`, with cuDNN's or XLA's attention;
- `stacked_k`: that step mapped over k adapters (`stacked_steps`, XLA attention,
  as the grouped trainer runs it), the batch already on the device;
- `wave_k`: as `stacked_k`, called as `stacked_wave.Wave` calls it: the
  ahead-compiled program, a host batch each step.

`compile` measures what a grouped job pays per batch width before its first
step: the k-adapter training and validation steps at each width, lowered
and compiled with each set of XLA options (`OPTIONS`: XLA's defaults, GEMM
autotuning off, Triton's GEMMs off as the study compiles them), and each compiled program's steady
ms/step, so that a faster compile can be weighed against slower steps:

    python -m benchmarks.grouped_step compile --model gemma_2b --adapters 9 --widths 80 144 256 --out DIR

Every variant sees the same batches (one padded or packed row per example,
all tokens weighted: the loss's heaviest case).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, and a quiet start, before any keras import
from benchmarks.gemma_shapes import lora_gemma, random_examples
from benchmarks.harness import add_summarize, emit, gpu_name, jax_peak, read_records, write_summary
from lorastudy.stacked_step import XLA_OPTIONS


def _timed(step, args, steps: int, warm: int = 3) -> float:
    """Seconds per step of `step(*args)`, fed its own outputs, after `warm` untimed steps."""
    import jax

    for _ in range(warm):
        args = step(*args)
    jax.block_until_ready(args)
    started = time.perf_counter()
    for _ in range(steps):
        args = step(*args)
    jax.block_until_ready(args)
    return (time.perf_counter() - started) / steps


def _feeder(program, frozen, batches, host: bool):
    """A step function over (trainable, state, alive) that cycles through `batches`."""
    import jax

    feed = batches if host else [jax.device_put(b) for b in batches]
    count = [0]

    def step(trainable, state, alive):
        batch = feed[count[0] % len(feed)]
        count[0] += 1
        trainable, state, alive, _ = program(trainable, state, alive, frozen, batch)
        return trainable, state, alive

    return step


def measure(args) -> None:
    import jax
    import numpy as np

    from lorastudy.finetune import Batches
    from lorastudy.stacked_step import run_steps, stacked_steps, without_fused_attention
    from lorastudy.training import TrainSettings, compile_for_training, make_optimizer

    out = Path(args.out)
    seq, batch = map(int, args.shape.split("x"))
    causal_lm = lora_gemma(args.model, args.rank)
    settings = TrainSettings(sequence_length=seq, batch_size=batch, length_bucketing=False, packing=args.packing)
    examples = random_examples([seq] * batch * 8, causal_lm.backbone.vocabulary_size)
    data = Batches(examples, [seq], batch, 0, packed=args.packing)
    batches = [data[i][0] for i in range(len(data))]
    tokens = seq * batch
    base = dict(model=args.model, rank=args.rank, seq=seq, batch=batch, packing=args.packing, gpu=gpu_name())

    def record(variant: str, seconds: float, adapters: int = 1) -> None:
        emit(out, phase="grouped_step", variant=variant, adapters=adapters, ms_per_step=1e3 * seconds,
             tokens_per_second=adapters * tokens / seconds, peak_device_memory_bytes=jax_peak(), **base)

    model = compile_for_training(causal_lm, settings, total_steps=10_000)
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
    started = time.perf_counter()
    model.fit(data, epochs=max(1, args.steps // len(data)), verbose=0)
    jax.block_until_ready(model.trainable_variables[0].value)
    record("fit", (time.perf_counter() - started) / (max(1, args.steps // len(data)) * len(data)))

    optimizer = make_optimizer(settings, 10_000)
    optimizer.build(model.trainable_variables)
    frozen = [v.value for v in model.non_trainable_variables]
    fresh = lambda k: _fresh(model, optimizer, k)  # noqa: E731

    for variant in ("run_fused", "run_xla"):
        if variant == "run_xla":
            without_fused_attention(causal_lm.backbone)
        train_one, _ = run_steps(model, optimizer)
        program = jax.jit(train_one, donate_argnums=(0, 1))
        record(variant, _timed(_feeder(program, frozen, batches, host=False), fresh(None), args.steps))

    train, _ = stacked_steps(model, optimizer)
    for k in args.adapters:
        host = [_stack(b, k) for b in batches]
        record(f"stacked_{k}", _timed(_feeder(train, frozen, host, host=False), fresh(k), args.steps), k)
        compiled = train.lower(*fresh(k), frozen, jax.tree.map(np.asarray, host[0])).compile()
        record(f"wave_{k}", _timed(_feeder(compiled, frozen, host, host=True), fresh(k), args.steps), k)


# XLA options a compile may take (`Lowered.compile`), by name: `triton_gemm_off`
# is what the grouped trainer compiles with (`stacked_step.XLA_OPTIONS`). XLA
# keeps each GEMM's autotuning result for the life of the process, so `compile`
# runs them in this order at each width: the options that autotune less first.
OPTIONS = {
    "autotune_off": {"xla_gpu_autotune_level": "0"},
    "triton_gemm_off": XLA_OPTIONS,
    "default": {},
}


def _fresh(model, optimizer, k: int | None):
    """New copies (the steps donate them) of the factors, optimizer state and `alive`: k stacked, or one unstacked (None)."""
    import jax.numpy as jnp

    copy = (lambda v: v.value + 0) if k is None else (lambda v: jnp.broadcast_to(v.value, (k, *v.shape)) + 0)  # noqa: E731
    alive = jnp.bool_(True) if k is None else jnp.ones((k,), bool)
    return [copy(v) for v in model.trainable_variables], [copy(v) for v in optimizer.variables], alive


def compile_costs(args) -> None:
    """Per width and option set: compile seconds of the k-adapter training and validation steps, and their steady ms/step."""
    import jax

    from lorastudy.finetune import Batches
    from lorastudy.stacked_step import stacked_steps, without_fused_attention
    from lorastudy.training import TrainSettings, compile_for_training, make_optimizer

    jax.config.update("jax_enable_compilation_cache", False)
    out, k = Path(args.out), args.adapters[0]
    causal_lm = lora_gemma(args.model, args.rank)
    without_fused_attention(causal_lm.backbone)
    settings = TrainSettings(sequence_length=max(args.widths), batch_size=args.batch, length_bucketing=False)
    model = compile_for_training(causal_lm, settings, total_steps=10_000)
    optimizer = make_optimizer(settings, 10_000)
    optimizer.build(model.trainable_variables)
    frozen = [v.value for v in model.non_trainable_variables]
    # The trainer's steps without its compiler options: each compile here names its own.
    train, validate = stacked_steps(model, optimizer, compiler_options=None)
    fresh = lambda: _fresh(model, optimizer, k)  # noqa: E731

    for width in args.widths:
        examples = random_examples([width] * args.batch, causal_lm.backbone.vocabulary_size)
        batch = Batches(examples, [width], args.batch, 0)[0][0]
        host = _stack(batch, k)
        for name in args.options:
            began = time.perf_counter()
            trainer = train.lower(*fresh(), frozen, host).compile(OPTIONS[name])
            train_compile = time.perf_counter() - began
            trainable = fresh()[0]
            began = time.perf_counter()
            validator = validate.lower(trainable, frozen, batch).compile(OPTIONS[name])
            validation_compile = time.perf_counter() - began
            train_s = _timed(_feeder(trainer, frozen, [host], host=True), fresh(), args.steps)
            validation_s = _timed(lambda *a: (validator(trainable, frozen, batch),), (None,), args.steps)
            emit(out, phase="compile", model=args.model, rank=args.rank, adapters=k, width=width, batch=args.batch,
                 options=name, train_compile_seconds=train_compile, validation_compile_seconds=validation_compile,
                 train_ms_per_step=1e3 * train_s, validation_ms_per_step=1e3 * validation_s, gpu=gpu_name())


def _stack(batch: dict, k: int) -> dict:
    import numpy as np

    return {key: np.stack([value] * k) for key, value in batch.items()}


def summarize(args) -> None:
    """benchmarks/results/grouped_step.{csv,json}: each variant against `fit` of the same process's shape."""
    raw = [r for r in read_records(args.results) if r["phase"] == "grouped_step"]
    rows = []
    for r in raw:
        same = lambda p: (p["run"], p["model"], p["seq"], p["batch"], p["packing"]) == (r["run"], r["model"], r["seq"], r["batch"], r["packing"])  # noqa: E731
        fit = next((p for p in raw if p["variant"] == "fit" and same(p)), None)
        rows.append({
            "run": r["run"], "model": r["model"], "seq x batch": f"{r['seq']}x{r['batch']}", "packing": r["packing"],
            "variant": r["variant"], "adapters": r["adapters"], "ms/step": f"{r['ms_per_step']:.1f}",
            "tokens/s": round(r["tokens_per_second"]),
            "vs fit": f"{r['tokens_per_second'] / fit['tokens_per_second']:.2f}" if fit else "",
            "peak GB": f"{r['peak_device_memory_bytes'] / 1e9:.1f}" if r.get("peak_device_memory_bytes") else "",
        })
    write_summary(Path(args.out), "grouped_step", rows, raw)
    compiles = [r for r in read_records(args.results) if r["phase"] == "compile"]
    if compiles:
        write_summary(Path(args.out), "grouped_step_compile", [_compile_row(r, compiles) for r in compiles], compiles)


def _compile_row(r: dict, records: list[dict]) -> dict:
    """One compile record, with its steps' time against XLA's defaults at the same width."""
    default = next(p for p in records if p["options"] == "default" and (p["run"], p["width"]) == (r["run"], r["width"]))
    return {
        "run": r["run"], "model": r["model"], "adapters x batch x width": f"{r['adapters']}x{r['batch']}x{r['width']}",
        "options": r["options"], "train compile s": f"{r['train_compile_seconds']:.1f}",
        "validation compile s": f"{r['validation_compile_seconds']:.1f}", "train ms/step": f"{r['train_ms_per_step']:.1f}",
        "validation ms/step": f"{r['validation_ms_per_step']:.1f}",
        "train step vs default": f"{r['train_ms_per_step'] / default['train_ms_per_step']:.3f}",
        "validation step vs default": f"{r['validation_ms_per_step'] / default['validation_ms_per_step']:.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--model", default="gemma_2b")
    p.add_argument("--shape", default="256x4", help="SEQxBATCH")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4])
    p.add_argument("--packing", action="store_true", help="packed rows, attention within each record (train.packing)")
    p.add_argument("--out", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--model", default="gemma_2b")
    c.add_argument("--rank", type=int, default=16, help="the group's largest rank, which every adapter is padded to")
    c.add_argument("--adapters", type=int, nargs=1, default=[9])
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--widths", type=int, nargs="+", default=[80, 144, 256])
    c.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--out", required=True)
    add_summarize(sub)
    args = parser.parse_args()
    {"run": measure, "compile": compile_costs, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

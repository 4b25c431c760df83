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
    import jax.numpy as jnp
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

    def fresh(k: int | None):
        """New copies (the steps donate them) of the factors, optimizer state and `alive`: k stacked, or one unstacked (None)."""
        copy = (lambda v: v.value + 0) if k is None else (lambda v: jnp.broadcast_to(v.value, (k, *v.shape)) + 0)  # noqa: E731
        alive = jnp.bool_(True) if k is None else jnp.ones((k,), bool)
        return [copy(v) for v in model.trainable_variables], [copy(v) for v in optimizer.variables], alive

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
    add_summarize(sub)
    args = parser.parse_args()
    {"run": measure, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

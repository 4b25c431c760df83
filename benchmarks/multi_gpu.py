"""One training job over several GPUs: data parallelism and weights split over GPUs.

    python -m benchmarks.multi_gpu worker --devices 2 --model-parallel 1 --model gemma_2b --shape 512x16 --out DIR
    python -m benchmarks.multi_gpu summarize benchmarks/results/multi_gpu/*.jsonl --out benchmarks/results

benchmarks/multi_gpu_gpu.sh runs the workers on a two-GPU machine, and the
side-by-side measurement: two finetune jobs of the workflow under
`--resources gpu=1` (one after the other) and `gpu=2` (each pinned to its own
GPU by lorastudy.gpus), timed by benchmarks/job_overhead.py.

A worker is one process: it builds a random-weight Gemma of the named shape
(benchmarks/gpu_lora.py's KerasHub configurations) under
`lorastudy.distribution.distributed`, exactly as the finetune stage does,
trains it with the finetune stage's own model, loss and batches for
`--steps` steps, and appends one JSON line: every step's loss, steady-state
tokens/s (after the first `--warmup` steps, which include compilation), and
the peak memory of the fullest GPU. Runs that differ only in their devices
see the same weights, LoRA initialisation and batches, so their losses can be
set side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, a quiet start
from benchmarks.gemma_shapes import KERAS_GEMMA, LEARNING_RATE, WEIGHT_DECAY, lora_gemma, random_examples
from benchmarks.harness import emit, gpu_name, software, write_csv


def worker(args) -> None:
    import jax

    from lorastudy.distribution import distributed
    from lorastudy.training import TrainSettings, compile_for_training
    from lorastudy.finetune import Batches

    seq, batch = map(int, args.shape.split("x"))
    shape = KERAS_GEMMA[args.model]
    steps = args.warmup + args.steps
    record = dict(phase="distributed_train", model=args.model, seq=seq, batch=batch, devices=args.devices,
                  model_parallel=args.model_parallel, rank=args.rank, gpu=gpu_name(),
                  visible_devices=len(jax.devices()), mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    with distributed(args.devices, args.model_parallel, batch, (shape["num_query_heads"], shape["num_key_value_heads"])):
        started = time.perf_counter()
        causal_lm = lora_gemma(args.model, args.rank)
        build_s = time.perf_counter() - started
        settings = TrainSettings(sequence_length=seq, batch_size=batch, length_bucketing=False,
                                 learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        data = Batches(random_examples([seq] * batch * steps, shape["vocabulary_size"]), [seq], batch, 0)
        model = compile_for_training(causal_lm, settings, total_steps=steps)
        clock = step_clock()
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[clock])
    steady = clock.ends[-1] - clock.ends[args.warmup - 1]
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") or 0 for d in jax.local_devices()]
    emit(Path(args.out), **record, build_s=build_s, first_steps_s=clock.ends[args.warmup - 1] - clock.started,
         steady_s=steady, tokens_per_s=seq * batch * args.steps / steady, losses=clock.losses,
         peak_bytes_per_device=peaks, software=software())


def step_clock():
    """A Keras callback that records each step's own loss (Keras logs the epoch's running mean) and end time."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started, self.ends, self.means, self.losses = time.perf_counter(), [], [], []

        def on_train_batch_end(self, batch, logs=None):
            mean = float(logs["loss"])  # waits for the step: the clock times finished steps
            self.ends.append(time.perf_counter())
            n = len(self.means)
            self.losses.append(mean * (n + 1) - (self.means[-1] * n if n else 0.0))
            self.means.append(mean)

    return StepClock()


def summarize(args) -> None:
    records = [json.loads(line) for path in args.results for line in open(path)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if any(r["phase"] == "distributed_train" for r in records):
        summarize_train(records, out)
    if any(r["phase"] == "workflow" for r in records):
        summarize_jobs(records, out)


def summarize_jobs(records: list[dict], out: Path) -> None:
    """Two finetune jobs, `--resources gpu=1` (one after the other) against `gpu=2` (side by side)."""
    runs = {r["label"]: r for r in records if r["phase"] == "workflow"}

    def jobs(run: dict) -> list[float]:
        return [j["seconds"] for j in run["jobs"] if j["job"].startswith("finetune/")]

    rows = []
    for label, r in runs.items():
        if not label.startswith("side_by_side"):
            continue
        subset = label.rsplit("_", 1)[1]
        before = runs[f"one_after_the_other_{subset}"]
        rows.append({
            "subset": subset, "one_after_the_other_s": round(before["seconds"], 1), "side_by_side_s": round(r["seconds"], 1),
            "jobs_per_hour_ratio": round(before["seconds"] / r["seconds"], 3),
            "finetune_job_s_one_after_the_other": jobs(before), "finetune_job_s_side_by_side": jobs(r),
            "job_span_ratio": round(sum(jobs(before)) / max(jobs(r)), 3),
            "compilation_cache": r.get("compilation_cache", ""),
        })
    write_csv(out / "multi_gpu_jobs.csv", rows)


def summarize_train(records: list[dict], out: Path) -> None:
    rows = []
    train = [r for r in records if r["phase"] == "distributed_train"]
    for r in train:
        single = next((b for b in train if (b["model"], b["seq"], b["batch"], b["devices"]) == (r["model"], r["seq"], r["batch"], 1)), None)
        n = min(len(r["losses"]), len(single["losses"])) if single else 0
        diffs = [abs(a - b) for a, b in zip(r["losses"][:n], single["losses"][:n])] if single else []
        rows.append({
            "model": r["model"], "shape": f"{r['seq']}x{r['batch']}", "devices": r["devices"], "model_parallel": r["model_parallel"],
            "mem_fraction": r["mem_fraction"], "tokens_per_s": round(r["tokens_per_s"]),
            "vs_one_gpu": round(r["tokens_per_s"] / single["tokens_per_s"], 3) if single else None,
            "losses_compared": n, "max_abs_loss_diff": max(diffs) if diffs else None,
            "peak_gib_fullest_gpu": round(max(r["peak_bytes_per_device"]) / 2**30, 2), "gpu": r["gpu"].splitlines()[0],
        })
    write_csv(out / "multi_gpu_train.csv", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("worker")
    w.add_argument("--model", default="gemma_2b", choices=list(KERAS_GEMMA))
    w.add_argument("--shape", default="512x16", help="SEQxBATCH")
    w.add_argument("--devices", type=int, default=1)
    w.add_argument("--model-parallel", type=int, default=1)
    w.add_argument("--rank", type=int, default=4)
    w.add_argument("--warmup", type=int, default=3, help="first steps, compilation included, left out of tokens/s")
    w.add_argument("--steps", type=int, default=50)
    w.add_argument("--out", required=True)
    s = commands.add_parser("summarize")
    s.add_argument("results", nargs="+")
    s.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "worker":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        worker(args)
    else:
        summarize(args)


if __name__ == "__main__":
    main()

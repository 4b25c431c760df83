"""The main job's CPU finetune under glibc's default malloc (a CPU worker's) and malloc that keeps what it frees, and by the loss's logit chunk.

    python -m benchmarks.cpu_malloc run --preset results/models/gemma3_270m_q4km/preset \\
        --train results/data/train_250.jsonl --val results/data/val.jsonl --out DIR [--records 96 --repeats 2]
    python -m benchmarks.cpu_malloc run --preset results/models/gemma3_270m_q4km/preset \\
        --train results/data/train_250.jsonl --val results/data/val.jsonl --out DIR \\
        --mallocs "glibc default" --chunks 134217728 16777216 4194304 1048576
    python -m benchmarks.cpu_malloc summarize --results DIR/results.jsonl

Each measurement is the main job's finetune job in a process of its own
(`lorastudy.stacked.finetune_group`: ranks 4 and 16 side by side, one epoch
of `--records` training and 16 validation records, its programs compiled
ahead on threads), the allocators taken in turn and repeated. It records
the wall, user and system seconds, the minor page faults (pages the kernel
had to map and zero: with glibc's defaults, XLA's step buffers too large
for an arena are mapped for each step and unmapped after it) and the
process's peak resident memory: memory kept for reuse must not pile up.
It did: with one arena for every thread, as CPU workers ran until this
benchmark said otherwise, the threads compiling ahead (lorastudy.ahead) and
the steps shared one heap that never shrank, 21 GB in the main job's
finetune job on this 24 GB machine, for 3-5% of this benchmark's wall time
(about a quarter of the main job's step time: docs/performance.md). An arena per
thread cannot keep the steps' buffers: they are allocated off the main
thread, and glibc maps a block too large for such an arena whatever the
tunables say.

`--chunks` repeats each allocator with the loss's logit values per chunk
(`lorastudy.loss.LOGIT_VALUES_PER_CHUNK`) set to each value in turn (0:
the CPU's own): the chunk's logits and their gradient are the step's
largest buffers. A ratio compares a run with glibc's default malloc and the
GPU's 2^27 values of the same repeat: the CPU worker as it was before
either change.
"""

from __future__ import annotations

import csv
import resource
import tempfile
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, before any keras import
from benchmarks.harness import emit, read_records, repeated_driver_arguments, run_worker, software, write_summary

KEPT = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
VARIANTS = {"glibc default": "", "one arena, kept": f"glibc.malloc.arena_max=1:{KEPT}", "arena per thread, kept": KEPT}


def worker(args) -> None:
    import lorastudy.loss
    from lorastudy.io import read_jsonl, write_jsonl
    from lorastudy.prompts import DEFAULT_TEMPLATE
    from lorastudy.stacked import finetune_group

    if args.chunk_values:
        lorastudy.loss.LOGIT_VALUES_PER_CHUNK["cpu"] = args.chunk_values
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "train.jsonl", read_jsonl(args.train)[: args.records])
        write_jsonl(tmp / "val.jsonl", read_jsonl(args.val)[:16])
        runs = [dict(name=f"r{rank}", rank=rank, seed=0, adapter_paths=(str(tmp / f"r{rank}_epoch1.lora.h5"),),
                     history_path=str(tmp / f"r{rank}_history.csv"), stats_path=str(tmp / f"r{rank}_train.json")) for rank in (4, 16)]
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        stats = finetune_group(args.preset, tmp / "train.jsonl", tmp / "val.jsonl", runs, DEFAULT_TEMPLATE, tmp / "checkpoints",
                               settings={"sequence_length": 128, "batch_size": 8, "learning_rate": 3e-4},
                               compilation_cache={"dir": str(tmp / "cache")})
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        # The same arithmetic either way: the validation loss must not move.
        val_loss = [row for row in csv.DictReader(open(tmp / "r4_history.csv")) if row["kind"] == "epoch"][-1]["val_loss"]
    emit(Path(args.out), phase="cpu_malloc", variant=args.variant, repeat=args.repeat, records=args.records, job="finetune_group",
         chunk_values=lorastudy.loss.logit_values_per_chunk("cpu"),
         seconds=wall, user_seconds=after.ru_utime - before.ru_utime, system_seconds=after.ru_stime - before.ru_stime,
         minor_faults=after.ru_minflt - before.ru_minflt, train_seconds=stats[0]["train_seconds"],
         validation_seconds=stats[0]["validation_seconds"], val_loss=float(val_loss),
         peak_rss_bytes=after.ru_maxrss * 1024)


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", software=software())
    common = ["--preset", args.preset, "--train", args.train, "--val", args.val, "--out", str(out), "--records", str(args.records)]
    for repeat in range(args.repeats):
        for variant in args.mallocs:
            for chunk in args.chunks:
                run_worker("benchmarks.cpu_malloc", ["worker", "--variant", variant, "--repeat", str(repeat), "--chunk-values", str(chunk), *common],
                           out, GLIBC_TUNABLES=VARIANTS[variant])


def summarize(args) -> None:
    raw = [r for r in read_records(args.results) if r["phase"] == "cpu_malloc"]
    # Runs before the CPU had a chunk of its own computed the GPU's 2^27 values at once.
    chunk = lambda r: r.get("chunk_values", 2**27)  # noqa: E731
    default = {(r["run"], r["repeat"]): r["seconds"] for r in raw if r["variant"] == "glibc default" and chunk(r) == 2**27}
    rows = [{
        "run": r["run"], "malloc": r["variant"], "logit values per chunk": f"2^{chunk(r).bit_length() - 1}", "repeat": r["repeat"],
        "records": r["records"], "wall s": f"{r['seconds']:.1f}",
        "user s": f"{r['user_seconds']:.1f}", "system s": f"{r['system_seconds']:.1f}", "page faults": r["minor_faults"],
        "train s": f"{r['train_seconds']:.1f}", "validation s": f"{r['validation_seconds']:.1f}",
        "val loss": f"{r['val_loss']:.6f}", "peak RSS GB": f"{r['peak_rss_bytes'] / 1e9:.1f}" if "peak_rss_bytes" in r else "",
        "x default at 2^27 (same repeat)": f"{r['seconds'] / default[r['run'], r['repeat']]:.2f}" if (r["run"], r["repeat"]) in default else "",
    } for r in raw]
    write_summary(Path(args.out), "cpu_malloc", rows, raw)


def shared_arguments(p) -> None:
    p.add_argument("--preset", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=96)


def worker_arguments(p) -> None:
    p.add_argument("--variant", choices=list(VARIANTS), required=True)
    p.add_argument("--chunk-values", type=int, default=0, help="the loss's logit values per chunk on the CPU (0: its own)")


def driver_arguments(p) -> None:
    p.add_argument("--mallocs", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--chunks", type=int, nargs="+", default=[0], help="logit values per chunk to run each malloc with (0: the CPU's own)")


def main() -> None:
    args = repeated_driver_arguments(__doc__, shared_arguments, worker_arguments, driver_arguments)
    {"run": run, "worker": worker, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

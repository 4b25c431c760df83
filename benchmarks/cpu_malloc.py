"""A CPU finetune with glibc's default malloc against the one a CPU worker runs with (`lorastudy.worker.CPU_MALLOC_TUNABLES`).

    python -m benchmarks.cpu_malloc run --preset results/models/gemma3_270m_q4km/preset \\
        --train results/data/train_250.jsonl --val results/data/val.jsonl --out DIR [--records 48 --repeats 2]
    python -m benchmarks.cpu_malloc summarize --results DIR/results.jsonl

Each measurement is one LoRA finetune of the main job's model and settings
(`lorastudy.finetune.finetune`, rank 4, one epoch of `--records` training and
16 validation records) in a process of its own, the two allocators taken in
turn and repeated. It records the wall, user and system seconds of the
finetune, its minor page faults (pages the kernel had to map and zero:
with a thread's arena per thread, XLA's step buffers too large for one are
mapped for each step and unmapped after it) and the process's peak resident
memory (kept memory must not pile up).
"""

from __future__ import annotations

import csv
import resource
import tempfile
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, before any keras import
from benchmarks.harness import emit, read_records, repeated_driver_arguments, run_worker, software, write_summary
from lorastudy.worker import CPU_MALLOC_TUNABLES

VARIANTS = {"glibc default": "", "one arena, kept": CPU_MALLOC_TUNABLES}


def worker(args) -> None:
    from lorastudy.finetune import finetune
    from lorastudy.io import read_jsonl, write_jsonl
    from lorastudy.prompts import DEFAULT_TEMPLATE

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jsonl(tmp / "train.jsonl", read_jsonl(args.train)[: args.records])
        write_jsonl(tmp / "val.jsonl", read_jsonl(args.val)[:16])
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        stats = finetune(args.preset, tmp / "train.jsonl", tmp / "val.jsonl", [tmp / "adapter_epoch1.lora.h5"], tmp / "history.csv",
                         tmp / "train.json", rank=4, template=DEFAULT_TEMPLATE,
                         settings={"sequence_length": 128, "batch_size": 8, "learning_rate": 3e-4}, compilation_cache={"dir": str(tmp / "cache")})
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        # The same arithmetic either way: the validation loss must not move.
        val_loss = [row for row in csv.DictReader(open(tmp / "history.csv")) if row["kind"] == "epoch"][-1]["val_loss"]
    emit(Path(args.out), phase="cpu_malloc", variant=args.variant, repeat=args.repeat, records=args.records, seconds=wall,
         user_seconds=after.ru_utime - before.ru_utime, system_seconds=after.ru_stime - before.ru_stime,
         minor_faults=after.ru_minflt - before.ru_minflt, train_seconds=stats["train_seconds"],
         validation_seconds=stats["validation_seconds"], val_loss=float(val_loss),
         peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", software=software())
    common = ["--preset", args.preset, "--train", args.train, "--val", args.val, "--out", str(out), "--records", str(args.records)]
    for repeat in range(args.repeats):
        for variant, tunables in VARIANTS.items():
            run_worker("benchmarks.cpu_malloc", ["worker", "--variant", variant, "--repeat", str(repeat), *common], out,
                       GLIBC_TUNABLES=tunables)


def summarize(args) -> None:
    raw = [r for r in read_records(args.results) if r["phase"] == "cpu_malloc"]
    default = {(r["run"], r["repeat"]): r["seconds"] for r in raw if r["variant"] == "glibc default"}
    rows = [{
        "run": r["run"], "malloc": r["variant"], "repeat": r["repeat"], "records": r["records"], "wall s": f"{r['seconds']:.1f}",
        "user s": f"{r['user_seconds']:.1f}", "system s": f"{r['system_seconds']:.1f}", "page faults": r["minor_faults"],
        "train s": f"{r['train_seconds']:.1f}", "validation s": f"{r['validation_seconds']:.1f}",
        "val loss": f"{r['val_loss']:.6f}", "peak RSS GB": f"{r['peak_rss_bytes'] / 1e9:.1f}" if "peak_rss_bytes" in r else "",
        "x default (same repeat)": f"{r['seconds'] / default[r['run'], r['repeat']]:.2f}" if (r["run"], r["repeat"]) in default else "",
    } for r in raw]
    write_summary(Path(args.out), "cpu_malloc", rows, raw)


def shared_arguments(p) -> None:
    p.add_argument("--preset", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=48)


def main() -> None:
    args = repeated_driver_arguments(__doc__, shared_arguments, lambda p: p.add_argument("--variant", choices=list(VARIANTS), required=True))
    {"run": run, "worker": worker, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

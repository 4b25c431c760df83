"""What every benchmark driver shares: records, workers, versions, the GPU's name and load.

A driver appends one JSON line per measurement to OUT/results.jsonl
(`emit`), runs each measurement in a process of its own (`run_worker`: its
own GPU memory and peak), and its `summarize` reads the lines back
(`read_records`) into the committed tables under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Dense bfloat16 peak of the GPUs the benchmarks ran on (SXM), for MFU.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}



def emit(out: Path, **record) -> None:
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    line = json.dumps(record)
    print("RESULT", line, flush=True)
    out.mkdir(parents=True, exist_ok=True)
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



def jax_peak() -> int | None:
    import jax

    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")



def software() -> dict[str, str]:
    """The versions of what a benchmark ran on ("absent" for what this machine lacks), and the CPU's model and cores.

    CPU timings are the CPU's: this project's 2-core machines have been an
    Intel Xeon (docs/performance.md's first figures) and, on other days, an
    AMD EPYC, at speeds far apart."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"cpu": f"{cpu_model() or platform.processor() or 'unknown'} x {os.cpu_count()}"}
    for package in ("jax", "jaxlib", "keras", "keras-hub", "snakemake", "torch", "transformers", "peft", "trl", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found



def cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (None where /proc/cpuinfo does not say)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def run_worker(module: str, arguments: list[str], out: Path, timeout: float | None = None, **env) -> tuple[subprocess.CompletedProcess, float]:
    """One measurement (`python -m module *arguments`) in a Python process of its own (its own GPU memory and peak); its output goes to out/workers.log.

    Returns the finished process and its wall seconds, start to exit. A
    process still running after `timeout` seconds is killed and returns 124
    with what it had printed."""
    command = [sys.executable, "-m", module, *arguments]
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92", "PYTHONUNBUFFERED": "1", **env}
    print("+", " ".join(command[2:]), flush=True)
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



def read_records(paths: list[str]) -> list[dict]:
    """The records of results.jsonl files, each with its file's stem as `run` and its environment record.

    A `.json` path is a summary's own records (`write_summary`), taken as they
    are: new runs are added to a committed table by naming it first.
    """
    records = []
    for path in paths:
        if str(path).endswith(".json"):
            records.extend(json.loads(Path(path).read_text()))
            continue
        run_env = None
        for line in open(path):
            record = json.loads(line)
            if record["phase"] == "environment":
                run_env = record
            else:
                records.append({**record, "run": Path(path).stem, "environment": run_env})
    return records



def repeated_driver_arguments(doc: str, shared: Callable[[argparse.ArgumentParser], None],
                              own: Callable[[argparse.ArgumentParser], None],
                              driver: Callable[[argparse.ArgumentParser], None] = lambda p: None) -> argparse.Namespace:
    """The command line of a driver that repeats its measurements: `run` (all of them, `--repeats` times) and
    `worker` (one, its `--repeat`) take the arguments `shared` adds, `worker` also those `own` adds and `run`
    those `driver` adds; and `summarize`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "worker"):
        shared(sub.add_parser(name))
    sub.choices["run"].add_argument("--repeats", type=int, default=2)
    driver(sub.choices["run"])
    own(sub.choices["worker"])
    sub.choices["worker"].add_argument("--repeat", type=int, required=True)
    add_summarize(sub)
    return parser.parse_args()


def add_summarize(subparsers) -> None:
    """A driver's `summarize` command: its results files (a committed summary's .json first, to add runs to it) and where its tables go."""
    p = subparsers.add_parser("summarize")
    p.add_argument("--results", nargs="+", required=True, help="results.jsonl files, after a summary's .json to add to it")
    p.add_argument("--out", default="benchmarks/results")



def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV, with every key any row has for the columns."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_summary(out: Path, name: str, rows: list[dict], records: list[dict]) -> None:
    """A driver's table as OUT/name.csv and the records it came from as OUT/name.json; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{name}.csv", rows)
    (out / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n")
    for row in rows:
        print(row)


class GpuSampler(threading.Thread):
    """nvidia-smi's utilisation.gpu, sampled every `every` seconds."""

    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stopped = every, [], threading.Event()
        self.times: list[float] = []  # each sample's seconds since the sampler started
        self.began = time.perf_counter()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout
                self.samples.append(float(text.split()[0]))
                self.times.append(round(time.perf_counter() - self.began, 1))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self.stopped.wait(self.every)


def dolly_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts shaped like Dolly's no-context records (prompt ~25 tokens, long-tailed responses)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.normal(28, 10, n), 12, None)
    response = rng.lognormal(np.log(60), 0.9, n)
    return [int(min(256, p + r)) for p, r in zip(prompt, response)]

"""Where a study's GPU time goes: per-job overhead, the compilation cache, logits only where the loss counts.

    python -m benchmarks.job_overhead logits --model gemma_2b --out DIR            # one GPU (or --preset DIR)
    python -m benchmarks.job_overhead workflow --checkout REPO --workdir W --label L --out DIR -- SNAKEMAKE ARGS
    python -m benchmarks.job_overhead summarize --results DIR/results.jsonl ... --out benchmarks/results

`logits`: one training step of the finetune stage's model, with logits at
every position (KerasHub's CausalLM output and Keras's masked cross-entropy,
this workflow's previous loss) against logits at the loss's positions alone
(`lorastudy.loss`), on Dolly-shaped batches whose prompt is masked. Each
variant runs in a process of its own, so each peak of device memory is its
own; steady-state step time is the median over timed steps after warm-up.

`workflow`: `snakemake` end to end in a checkout, as a user runs it, with
the GPU's utilisation sampled every second (nvidia-smi) and each job's
wall time (Snakemake's benchmark files) and its own split into loading,
compilation and steady-state work (train.json, generate.json, where the
checkout writes them). Run it on two checkouts (before and after a change)
in one session for a ratio.

Each measurement appends one JSON line to DIR/results.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, a quiet start
from benchmarks.harness import GpuSampler, dolly_like_lengths, emit, software, write_csv
from benchmarks.study_table import study_table

REPO = Path(__file__).resolve().parents[1]


def device() -> str:
    import jax

    return jax.devices()[0].device_kind


# --------------------------------------------------------------------------
# logits: full against response-only
# --------------------------------------------------------------------------


def dolly_batches(n_batches: int, batch: int, width: int, vocab: int, seed: int = 0):
    """Batches shaped like Dolly's no-context records: a masked prompt of ~28 tokens, a long-tailed response."""
    import numpy as np


    rng = np.random.default_rng(seed)
    lengths = dolly_like_lengths(n_batches * batch, seed)
    out = []
    for b in range(n_batches):
        tokens = rng.integers(3, vocab, (batch, width + 1)).astype("int32")
        mask = np.zeros((batch, width), bool)
        weights = np.zeros((batch, width), "float32")
        for r in range(batch):
            n = min(width, lengths[b * batch + r])
            prompt = min(n - 1, int(np.clip(rng.normal(28, 10), 12, 60)))
            mask[r, :n] = True
            weights[r, prompt:n] = 1.0
        out.append((tokens, mask, weights))
    return out


def logits_worker(args) -> None:
    import jax
    import keras
    import numpy as np

    from lorastudy.training import TrainSettings, compile_for_training, make_optimizer
    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.presets import dtype_policies, load_causal_lm

    out = Path(args.out)
    import lorastudy.loss

    if args.chunk_values:
        lorastudy.loss.LOGIT_VALUES_PER_CHUNK[jax.default_backend()] = args.chunk_values
    dtype, lora_policy = dtype_policies("auto", training=True)
    if args.preset:
        causal_lm = load_causal_lm(args.preset, dtype=dtype)
        model_name = Path(args.preset).parent.name
    else:
        from gpu_lora import keras_gemma

        causal_lm = keras_gemma(args.model, dtype)
        model_name = args.model
    enable_lora(causal_lm.backbone, LoraSpec(args.rank), lora_policy)
    vocab = causal_lm.backbone.vocabulary_size
    settings = TrainSettings(sequence_length=args.width, batch_size=args.batch)
    batches = dolly_batches(args.steps + args.warmup, args.batch, args.width, vocab)
    if args.variant == "full":
        model = keras.Model(causal_lm.input, causal_lm.output)
        model.compile(
            optimizer=make_optimizer(settings, 1000),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        feed = lambda t, m, w: ({"token_ids": t[:, :-1], "padding_mask": m}, t[:, 1:], w)  # noqa: E731
    else:
        model = compile_for_training(causal_lm, settings, 1000)
        feed = lambda t, m, w: ({"token_ids": t[:, :-1], "padding_mask": m, "targets": t[:, 1:], "loss_weights": w}, w.sum(axis=1))  # noqa: E731
    times, losses = [], []
    for i, (t, m, w) in enumerate(batches):
        started = time.perf_counter()
        logs = model.train_on_batch(*feed(t, m, w), return_dict=True)
        jax.block_until_ready(model.trainable_variables[0].value)
        losses.append(float(logs["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    stats = jax.local_devices()[0].memory_stats() or {}
    import resource

    weighted = float(np.mean([w.sum() / w.size for _, _, w in batches]))
    chunk = lorastudy.loss.logit_values_per_chunk() if args.variant == "response" else None
    emit(out, phase="logits", variant=args.variant, chunk_values=chunk, model=model_name, vocabulary=vocab, rank=args.rank, width=args.width,
         batch=args.batch, loss_share=weighted, steps=args.steps, step_ms=1000 * statistics.median(times),
         step_ms_all=[1000 * x for x in times], first_losses=losses[:3], device=device(), backend=jax.default_backend(),
         peak_device_bytes=stats.get("peak_bytes_in_use"), peak_host_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def logits(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for batch in args.batches:
        for variant in ("full", "response"):
            cmd = [sys.executable, "-m", "benchmarks.job_overhead", "logits-worker", "--variant", variant, "--batch", str(batch), "--out", str(out),
                   "--width", str(args.width), "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   *(["--preset", args.preset] if args.preset else ["--model", args.model])]
            print("+", " ".join(cmd[2:]), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"})
            if done.returncode:
                print(done.stdout[-3000:], done.stderr[-3000:], flush=True)


# --------------------------------------------------------------------------
# workflow: end to end, as a user runs it
# --------------------------------------------------------------------------


def job_records(workdir: Path) -> list[dict]:
    """Every job's wall time (Snakemake's benchmark files) and, where written, its own time split."""
    jobs = []
    for tsv in sorted((workdir / "logs" / "benchmarks").rglob("*.tsv")):
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        jobs.append({"job": str(tsv.relative_to(workdir / "logs" / "benchmarks").with_suffix("")), "seconds": float(row["s"])})
    splits = {}
    for path in (workdir / "results" / "finetune").rglob("train.json"):
        s = json.loads(path.read_text())
        splits[str(path.relative_to(workdir))] = {k: s.get(k) for k in (
            "load_seconds_this_run", "train_seconds", "train_compile_seconds", "validation_seconds", "validation_compile_seconds",
            "steady_train_seconds", "tokens_per_second", "steady_tokens_per_second", "batch_widths", "padded_tokens_per_epoch",
            "tokens_seen", "compiled_programs_this_run", "cache_hits_this_run", "wall_seconds_this_run",
            "runs_side_by_side", "wave_seconds", "peak_device_memory_bytes")}
    for path in (workdir / "results" / "generate").rglob("generate.json"):
        s = json.loads(path.read_text())
        splits[str(path.relative_to(workdir))] = {k: s.get(k) for k in (
            "load_seconds", "runs_in_job", "batch_size", "seconds", "compile_seconds", "steady_seconds", "new_tokens",
            "new_tokens_per_second", "steady_new_tokens_per_second", "compiled_programs", "cache_hits")}
    return jobs, splits


def job_spans(log: str, began: float | None = None) -> list[dict]:
    """Each job's rule and wall seconds, from Snakemake's own log (start and 'Finished jobid' stamps).

    With `began` (the run's start, `time.time()`), each span also says when it
    started, in seconds after it (Snakemake's stamps are whole seconds).
    """
    import re
    from datetime import datetime

    stamp, started, rules, spans = None, {}, {}, []
    for line in log.splitlines():
        if m := re.fullmatch(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", line.strip()):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line.strip()):
            rule = m.group(1)
        elif (m := re.fullmatch(r"jobid: (\d+)", line.strip())) and stamp is not None:
            started.setdefault(m.group(1), stamp)
            rules.setdefault(m.group(1), rule)
        elif m := re.match(r"Finished jobid: (\d+) \(Rule: (\w+)\)", line.strip()):
            start = started[m.group(1)]
            spans.append({"rule": m.group(2), "seconds": (stamp - start).total_seconds()}
                         | ({"start": start.timestamp() - began} if began is not None else {}))
    return spans


def workflow(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(Path(args.checkout) / "workflow" / "Snakefile"),
           "--directory", str(workdir), *args.snakemake]
    sampler = GpuSampler()
    sampler.start()
    started, began = time.perf_counter(), time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    sampler.stopped.set()
    (out / f"workflow_{args.label}.log").write_text(done.stdout + done.stderr)
    jobs, splits = job_records(workdir)
    samples = sampler.samples
    emit(out, phase="workflow", label=args.label, returncode=done.returncode, seconds=seconds, jobs=jobs, splits=splits,
         spans=job_spans(done.stdout + done.stderr, began),
         gpu_utilisation_mean=sum(samples) / len(samples) if samples else None, gpu_samples=len(samples),
         gpu_timeline=[[t, u] for t, u in zip(sampler.times, samples)],
         command=" ".join(args.snakemake))
    if done.returncode:
        print(done.stderr[-3000:], flush=True)


# --------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------


def summarize(args) -> None:
    records = []
    for path in args.results:
        for line in open(path):
            r = json.loads(line)
            log = Path(path).parent / f"workflow_{r.get('label')}.log"
            if r["phase"] == "workflow" and "spans" not in r and log.is_file():
                r["spans"] = job_spans(log.read_text())
            records.append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job_overhead.json").write_text(json.dumps({"records": records, "software": software()}, indent=1) + "\n")
    lines = ["| model | vocabulary | width x batch | loss tokens | logit values per chunk | full logits ms/step | response-only ms/step | "
             "speed-up | full peak GiB | response-only peak GiB | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    full = {(r["model"], r["width"], r["batch"], r["device"]): r for r in records if r["phase"] == "logits" and r["variant"] == "full"}
    peak = lambda r: (r["peak_device_bytes"] or r["peak_host_bytes"]) / 2**30  # noqa: E731
    ours_records = [r for r in records if r["phase"] == "logits" and r["variant"] == "response"]
    for ours in sorted(ours_records, key=lambda r: (r["model"], r["device"], r["batch"], r["chunk_values"])):
        base = full.get((ours["model"], ours["width"], ours["batch"], ours["device"]))
        if base is None:
            continue
        row = dict(model=ours["model"], vocabulary=ours["vocabulary"], width=ours["width"], batch=ours["batch"], loss_share=ours["loss_share"],
                   chunk_values=ours["chunk_values"], device=ours["device"], full_step_ms=base["step_ms"], response_step_ms=ours["step_ms"],
                   speedup=base["step_ms"] / ours["step_ms"], full_peak_gib=peak(base), response_peak_gib=peak(ours),
                   memory="device" if base["peak_device_bytes"] else "host RSS")
        rows.append(row)
        lines.append(f"| {row['model']} | {row['vocabulary']:,} | {row['width']} x {row['batch']} | {100 * row['loss_share']:.0f}% | "
                     f"2^{row['chunk_values'].bit_length() - 1} | {row['full_step_ms']:.1f} | {row['response_step_ms']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['full_peak_gib']:.2f} | {row['response_peak_gib']:.2f} | {row['device']} ({row['memory']}) |")
    if rows:
        write_csv(out / "job_overhead_logits.csv", rows)
    runs = [r for r in records if r["phase"] == "workflow" and r["returncode"] == 0]
    if runs:
        lines += ["", "| workflow run | wall s | GPU utilisation | finetune jobs s | generate jobs s | score jobs s |", "|---|---|---|---|---|---|"]
        table = []
        for r in runs:
            total = lambda rule: sum(j["seconds"] for j in r["spans"] if j["rule"].startswith(rule))  # noqa: E731
            row = dict(label=r["label"], seconds=r["seconds"], gpu_utilisation_mean=r["gpu_utilisation_mean"],
                       finetune_s=total("finetune"), generate_s=total("generate"), score_s=total("score"), jobs=len(r["spans"]))
            table.append(row)
            util = f"{row['gpu_utilisation_mean']:.0f}%" if row["gpu_utilisation_mean"] is not None else "-"
            lines.append(f"| {r['label']} | {r['seconds']:.0f} | {util} | {row['finetune_s']:.0f} | {row['generate_s']:.0f} | {row['score_s']:.0f} |")
        write_csv(out / "job_overhead_workflow.csv", table)
    lines += paper_grid_table([r for r in runs if r["label"].startswith("paper_")], out)
    (out / "job_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def paper_grid_table(parts: list[dict], out: Path) -> list[str]:
    """The paper grid's parts: wall, GPU jobs and their own split, with the whole grid's total.

    Every part runs the base model's evaluation and builds the model, so the
    total counts those once (from the first part).
    """
    if not parts:
        return []
    table = []
    for i, r in enumerate(parts):
        gpu_jobs = [j for j in r["jobs"] if j["job"].startswith(("finetune/", "generate/"))]
        if i:
            gpu_jobs = [j for j in gpu_jobs if not j["job"].endswith("/base")]
        train = [s for k, s in r["splits"].items() if k.endswith("train.json")]
        evals = {k: s for k, s in r["splits"].items() if k.endswith("generate.json") and (i == 0 or "/base/" not in k)}
        jobs_load = {k.rsplit("_epoch", 1)[0]: s["load_seconds"] for k, s in evals.items()}
        table.append(dict(
            part=r["label"], wall_s=r["seconds"], gpu_utilisation_mean=r["gpu_utilisation_mean"],
            gpu_jobs=len(gpu_jobs), gpu_job_s=sum(j["seconds"] for j in gpu_jobs),
            load_s=sum(s["load_seconds_this_run"] for s in train) + sum(jobs_load.values()),
            compile_s=sum(s["train_compile_seconds"] + s["validation_compile_seconds"] for s in train)
            + sum(s["compile_seconds"] for s in evals.values()),
            steady_train_s=sum(s["steady_train_seconds"] for s in train),
            steady_generate_s=sum(s["steady_seconds"] for s in evals.values())))
    total = {k: sum(row[k] for row in table) for k in table[0] if k not in ("part", "gpu_utilisation_mean")}
    total["part"] = "whole grid (base evaluated once)"
    total["gpu_utilisation_mean"] = sum(row["gpu_utilisation_mean"] * row["wall_s"] for row in table) / total["wall_s"]
    table.append(total)
    write_csv(out / "paper_2b_grid.csv", table)
    lines = ["", "| paper grid, Gemma 2B shape | wall s | GPU jobs | GPU jobs s | load s | compile s | steady training s | "
             "steady generation s | GPU utilisation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['part']} | {row['wall_s']:.0f} | {row['gpu_jobs']} | {row['gpu_job_s']:.0f} | {row['load_s']:.0f} | {row['compile_s']:.0f} | "
                     f"{row['steady_train_s']:.0f} | {row['steady_generate_s']:.0f} | {row['gpu_utilisation_mean']:.0f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in [("logits", logits), ("logits-worker", logits_worker)]:
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--model", default="gemma_2b", help="a KerasHub Gemma shape of benchmarks/gpu_lora.py, random weights")
        p.add_argument("--preset", help="a prepared preset directory instead (real weights)")
        p.add_argument("--rank", type=int, default=4)
        p.add_argument("--width", type=int, default=256)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--chunk-values", type=int, default=0, help="logit values computed at once (0: lorastudy.loss's own)")
        p.add_argument("--out", required=True)
        if name == "logits":
            p.add_argument("--batches", type=int, nargs="+", default=[4, 8])
        else:
            p.add_argument("--batch", type=int, required=True)
            p.add_argument("--variant", choices=["full", "response"], required=True)
    p = sub.add_parser("workflow")
    p.set_defaults(fn=workflow)
    p.add_argument("--checkout", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("snakemake", nargs=argparse.REMAINDER, help="after --: snakemake's arguments")
    p = sub.add_parser("summarize")
    p.set_defaults(fn=summarize)
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("study", help="the table of benchmarks/results/study_gpu.json")
    p.set_defaults(fn=study_table)
    p.add_argument("--study", default="benchmarks/results/study_gpu.json")
    p.add_argument("--out", default="benchmarks/results/study_gpu.md")
    args = parser.parse_args()
    if getattr(args, "snakemake", None) and args.snakemake[0] == "--":
        args.snakemake = args.snakemake[1:]
    args.fn(args)


if __name__ == "__main__":
    main()

"""Issue 25's study tables (benchmarks/study_gpu.sh's runs, kept in results/study_gpu.json).

    python -m benchmarks.job_overhead study   # writes results/study_gpu.md

Each workflow run's wall, GPU busy and its jobs' own split, and for runs that
kept nvidia-smi's samples with their times, where the GPU waited.
"""

from __future__ import annotations

import json
from pathlib import Path


GPU_RULES = ("prepare_model", "finetune", "generate", "generate_base")


def idle_by_stage(record: dict) -> dict[str, float]:
    """The GPU's idle seconds (one minus its utilisation, over nvidia-smi's samples) under each GPU job, and elsewhere.

    A sample belongs to the GPU job whose span holds it (GPU jobs run one at a
    time on one GPU); samples under no GPU job are the CPU-only stages (data,
    scoring, summary, figures, report) and Snakemake's own start and end.
    """
    spans = sorted((s["start"], s["start"] + s["seconds"], s["rule"]) for s in record["spans"] if s["rule"] in GPU_RULES)
    idle: dict[str, float] = {}
    last = 0.0
    for t, util in record["gpu_timeline"]:
        stage = next((f"{rule} {n}" for n, (a, b, rule) in enumerate(spans, 1) if a <= t < b), "CPU-only stages and Snakemake")
        idle[stage] = idle.get(stage, 0.0) + (t - last) * (1 - util / 100)
        last = t
    return {k: round(v, 1) for k, v in idle.items()}


def study_table(args) -> None:
    """Issue 25's study benchmark (benchmarks/study_gpu.sh): each workflow run's wall, GPU busy and jobs' split."""
    study = json.loads(Path(args.study).read_text())
    lines = ["| machine | run | wall s | GPU busy | prepare_model s | finetune jobs s | generate jobs s | "
             "finetune jobs' load / compile / steady train / validation s | generate: load / compile / steady s | runs side by side |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in study["records"]:
        total = lambda rule: sum(j["seconds"] for j in r["spans"] if j["rule"] == rule)  # noqa: E731
        train = [v for k, v in r["splits"].items() if k.endswith("train.json")]
        gen = [v for k, v in r["splits"].items() if k.endswith("generate.json")]
        # A grouped job's runs share one split (a run's share is the group's over its runs).
        group = lambda v: v.get("wave_seconds") or {k: v[k] for k in ("train_seconds", "train_compile_seconds", "validation_seconds")}  # noqa: E731
        # One split per finetune job: a group's runs repeat theirs.
        jobs = {(v["load_seconds_this_run"], json.dumps(v["wave_seconds"], sort_keys=True)) if v.get("wave_seconds") else k: v
                for k, v in enumerate(train)}.values()
        t = train[0] if train else None
        split = "-"
        if t:
            sums = [0.0, 0.0, 0.0, 0.0]
            for v in jobs:
                w = group(v)
                compiled = w["train_compile_seconds"] + w.get("validation_compile_seconds", v["validation_compile_seconds"])
                parts = (v["load_seconds_this_run"], compiled, w["train_seconds"] - w["train_compile_seconds"], w["validation_seconds"])
                sums = [a + b for a, b in zip(sums, parts)]
            split = " / ".join(f"{x:.1f}" for x in sums)
        gsplit = "-"
        if gen:
            loads = {g["load_seconds"] for g in gen}
            gsplit = f"{sum(loads):.1f} / {sum(g['compile_seconds'] for g in gen):.1f} / {sum(g['steady_seconds'] for g in gen):.1f}"
        busy = f"{r['gpu_utilisation_mean']:.0f}%" if r.get("gpu_utilisation_mean") is not None else "-"
        side = (t.get("runs_side_by_side") or 1) if t else "-"
        status = "" if r["returncode"] == 0 else " (failed: see note)"
        lines.append(f"| {r['machine']} | {r['label']}{status} | {r['seconds']:.0f} | {busy} | {total('prepare_model'):.0f} | "
                     f"{total('finetune'):.0f} | {total('generate') + total('generate_base'):.0f} | {split} | {gsplit} | {side} |")
    timed = [r for r in study["records"] if r.get("idle_by_stage")]
    if timed:
        lines += ["", "Where the GPU waited: idle seconds (one minus nvidia-smi's utilisation) under each GPU job, "
                  "numbered in the order they ran, and under none.", "", "| machine | run | idle s | under each |", "|---|---|---|---|"]
        for r in timed:
            idle = r["idle_by_stage"]
            under = ", ".join(f"{k} {v:.0f}" for k, v in idle.items())
            lines.append(f"| {r['machine']} | {r['label']} | {sum(idle.values()):.0f} | {under} |")
    text = f"# {study['title']}\n\n{study['summary']}\n\n" + "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)

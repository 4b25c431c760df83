"""The tables of benchmarks/gpu_lora.py's records: `python -m benchmarks.gpu_lora summarize` writes them.

Ours and the peer's record of each setting are paired within one run (one
lent machine), so that every ratio compares a machine with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import read_records, write_csv


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
    records = read_records(args.results)
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
        both_ran = row["ours_tokens_per_s"] and row["peft_tokens_per_s"]
        row["ratio"] = row["ours_tokens_per_s"] / row["peft_tokens_per_s"] if both_ran else None
        table.append(row)
        ours_cells = (f"{row['ours_tokens_per_s']:,.0f} | {100 * row['ours_mfu']:.1f}% | {row['ours_peak_gib']:.1f}"
                      if row["ours_tokens_per_s"] else "out of memory | - | -")
        peft_cells = (f"{row['peft_tokens_per_s']:,.0f} | {row['peft_peak_gib']:.1f}" if row["peft_tokens_per_s"] else "out of memory | -")
        ratio_cell = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        lines.append(f"| {row['model']} | {row['rank']} | {row['seq']} x {row['batch']} | {ours_cells} | {peft_cells} | {ratio_cell} |")
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
    table = [r for r in records if r["phase"] == "bucketing"]
    plain = next((r for r in table if not r["length_bucketing"]), None)
    if plain is not None:
        lines += ["", "| batching | bucket widths | padded tokens | useful tokens/s | vs padded | first epoch s (compiles) |", "|---|---|---|---|---|---|"]
    for r in table if plain is not None else []:
        name = f"buckets of {r['pad_multiple']}" if r["length_bucketing"] else "padded to 256"
        lines.append(f"| {name} | {r['widths']} | {r['padded_tokens']:,} | {r['useful_tokens_per_s']:,.0f} | "
                     f"{r['useful_tokens_per_s'] / plain['useful_tokens_per_s']:.2f}x | {r['first_epoch_seconds']:.0f} |")
    if plain is not None:
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

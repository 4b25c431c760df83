"""LoRA on a quantized base (train.quantize) on one GPU: tokens/s and peak memory of training steps.

    python -m benchmarks.quantized_gpu run --out DIR
    python -m benchmarks.quantized_gpu summarize --results [benchmarks/results/quantized_gpu.json] DIR/results.jsonl --out benchmarks/results

For Gemma 2B's and 7B's shapes (random weights, KerasHub's configurations),
the study's own training step (benchmarks.gpu_lora.ours_train: LoRA rank 4
on query and value, AdamW, the finetune stage's batches) on a base left in
bfloat16 or quantized by Keras to int8 or int4 before LoRA is enabled
(lorastudy.presets.quantize_base), each in a process of its own. Then 7B on
a GPU capped at 24 GB (XLA_PYTHON_CLIENT_MEM_FRACTION, with JAX's usual
preallocation: the process can use no more), as on a 24 GB card, without
and with gradient checkpointing (train.gradient_checkpointing: each decoder
block rematerialized, as `--remat`). Peaks are
the device's own `peak_bytes_in_use`. float8 is not measured: Keras's float8
layers have no LoRA path, and the study refuses it (train.quantize).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, and a quiet start, before any keras import
from benchmarks.gemma_shapes import KERAS_GEMMA, keras_gemma
from benchmarks.gpu_lora import ours_train
from benchmarks.harness import add_summarize, emit, gpu_name, read_records, run_worker, software, write_summary

SHAPES = ["256x8", "512x8"]
MODES = ("none", "int8", "int4")
CAP_BYTES = 24e9


def worker(args) -> None:
    import contextlib

    import keras

    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.presets import dtype_policies

    dtype, lora_policy = dtype_policies("auto")
    # train.gradient_checkpointing's scope (lorastudy.presets.load_causal_lm): every decoder block rematerialized.
    blocks = [f"decoder_block_{i}" for i in range(KERAS_GEMMA[args.model]["num_layers"])]
    with keras.RematScope(mode="list_of_layers", layer_names=blocks) if args.remat else contextlib.nullcontext():
        causal_lm = keras_gemma(args.model, dtype)
    enable_lora(causal_lm.backbone, LoraSpec(4), lora_policy, quantize=args.quantize)
    label = f"{args.model} {args.quantize}" + (" cap24" if args.capped else "") + (" remat" if args.remat else "")
    ours_train(argparse.Namespace(out=args.out, model=label, rank=4, precision="auto", attention="cudnn",
                                  shapes=args.shapes, steps=args.steps), causal_lm=causal_lm)


def device_bytes() -> float:
    query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    return float(subprocess.run(query, capture_output=True, text=True).stdout.split()[0]) * 2**20


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", gpu=gpu_name(), software=software())
    common = ["--out", str(out), "--steps", str(args.steps), "--shapes", *args.shapes]
    for model in args.models:
        for quantize in MODES:
            run_worker("benchmarks.quantized_gpu", ["worker", "--model", model, "--quantize", quantize, *common], out)
    if not args.capped_model:
        return
    fraction = f"{CAP_BYTES / device_bytes():.4f}"
    for remat in ([], ["--remat"]):
        for quantize in MODES:
            run_worker("benchmarks.quantized_gpu", ["worker", "--model", args.capped_model, "--quantize", quantize, "--capped", *remat,
                                                    *common], out, XLA_PYTHON_CLIENT_MEM_FRACTION=fraction)


def summarize(args) -> None:
    raw = read_records(args.results)
    records = [{**r} for r in raw if r["phase"] == "train"]
    for r in records:
        # Before gpu_lora.synced, steps that failed on the device (allocator out of memory under the
        # cap, in workers.log) were timed as if they ran: more than the GPU's peak FLOP/s cannot be.
        if r.get("fits") and r.get("mfu", 0) > 1:
            r["fits"], r["error"] = False, f"steps failed (MFU {r['mfu']:.0f} is impossible): out of memory"
    rows = []
    for r in records:
        model, quantize, *options = r["model"].split()
        # The bfloat16 base at the same shape, from the same run where it has one.
        plains = [p for p in records if p["model"] == f"{model} none" and (p["seq"], p["batch"]) == (r["seq"], r["batch"])
                  and p.get("fits")]
        plain = next((p for p in plains if p["run"] == r["run"]), plains[0] if plains else None)
        rows.append({
            "model": model, "quantize": quantize, "GPU memory": "24 GB cap" if "cap24" in options else "whole H200",
            "gradient checkpointing": "remat" in options,
            "seq x batch": f"{r['seq']}x{r['batch']}", "fits": r.get("fits"),
            "tokens/s": round(r["tokens_per_s"]) if r.get("fits") else "",
            "vs bfloat16 base, uncapped": f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}" if r.get("fits") and plain else "",
            "peak GB": f"{r['peak_bytes'] / 1e9:.1f}" if r.get("fits") and r.get("peak_bytes") else "",
            "compile s": f"{r['compile_s']:.0f}" if r.get("fits") else "",
        })
    write_summary(Path(args.out), "quantized_gpu", rows, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=["gemma_2b", "gemma_7b"])
    p.add_argument("--shapes", nargs="+", default=SHAPES)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--capped-model", default="gemma_7b", help="the model trained on a 24 GB cap ('' for none)")
    w = sub.add_parser("worker")
    w.add_argument("--model", required=True)
    w.add_argument("--quantize", required=True, choices=MODES)
    w.add_argument("--capped", action="store_true")
    w.add_argument("--remat", action="store_true", help="gradient checkpointing: each decoder block rematerialized")
    w.add_argument("--shapes", nargs="+", default=SHAPES)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--out", required=True)
    add_summarize(sub)
    args = parser.parse_args()
    {"run": run, "worker": worker, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

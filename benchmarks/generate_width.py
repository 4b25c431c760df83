"""An evaluation's decode time against `generate.pad_multiple` and `generate.batch_size`, on the main job's own model and prompts (CPU).

    python -m benchmarks.generate_width run --preset results/models/gemma3_270m_q4km/preset \\
        --test results/data/test.jsonl --out DIR [--batch-sizes 16 25 50 100 --multiples 8 --prefills prompts whole]
    python -m benchmarks.generate_width summarize --results DIR/results.jsonl

KerasHub's generation loop runs from a batch's shortest prompt to the end of
its width (the longest prompt and the new tokens, rounded up to
`pad_multiple`), so the rounding is paid in decode steps by every row of the
batch, and a larger batch, with its wider spread of prompt lengths, pays
more steps per row. Before the loop, one pass seeds the cache: over the
prompts only (`--prefills prompts`, `lorastudy.prefill`, this version's) or
over the whole width (`whole`, KerasHub's own pass). Each measurement
answers the test prompts once (`lorastudy.generate.generate`, the
evaluation job's own function, at the main job's new tokens), in a process
of its own, the batch sizes, multiples and first passes taken in turn and
repeated: with the base model alone, or with `--adapter` (one of the main
job's) on LoRA variables, as the evaluation job answers for every run. It
records the decode steps the batches take, the positions the first pass
covers, the compile and steady seconds, the steady milliseconds a row's
decode step costs, and whether the answers equal those of the first
measurement.
"""

from __future__ import annotations

import contextlib
import filecmp
import tempfile
from pathlib import Path

import lorastudy  # noqa: F401 - JAX as Keras's backend, before any keras import
from benchmarks.harness import emit, read_records, repeated_driver_arguments, run_worker, software, write_summary


def worker(args) -> None:
    import keras_hub

    from lorastudy.answer_batch import answer_batches
    from lorastudy.generate import generate, prompt_token_ids
    from lorastudy.io import read_jsonl
    from lorastudy.prompts import PromptTemplate, template_for

    from lorastudy import generate as generate_module

    out = Path(args.out)
    template = template_for(args.prompt_format)
    answers = out / f"answers_{args.prefill}_{args.pad_multiple}_{args.batch_size}_{args.repeat}.jsonl"
    settings = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, pad_multiple=args.pad_multiple)
    if args.prefill == "whole":
        generate_module.prefill_prompts_only = lambda causal_lm, new_tokens: contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [args.adapter] if args.adapter else []
        [stats] = generate(args.preset, args.test, [answers], [Path(tmp) / "generate.json"], template, adapters=adapters, settings=settings)
    # The batches the evaluation answered, as it forms them: the loop decodes from each one's shortest prompt to its width.
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(args.preset)
    prompt = PromptTemplate(template)
    prompt_ids = prompt_token_ids(tokenizer, [prompt.prompt(r["instruction"]) for r in read_jsonl(args.test)])
    batches = answer_batches(prompt_ids, args.batch_size, args.max_new_tokens, args.pad_multiple)
    first = out / f"answers_{args.prefills[0]}_{args.multiples[0]}_{args.batch_sizes[0]}_0.jsonl"
    unseeded = args.max_new_tokens if args.prefill == "prompts" else 0
    emit(out, phase="generate_width", pad_multiple=args.pad_multiple, repeat=args.repeat, prompts=len(prompt_ids), adapter=args.adapter,
         prefill=args.prefill, prefill_positions=sum(args.batch_size * (width - unseeded) for _, width in batches),
         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, widths=sorted({width for _, width in batches}),
         decode_steps=sum(width - min(len(prompt_ids[i]) for i in batch) for batch, width in batches), seconds=stats["seconds"],
         compile_seconds=stats["compile_seconds"], steady_seconds=stats["steady_seconds"],
         answers_equal_first=filecmp.cmp(answers, first, shallow=False) if first.exists() else None)


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", software=software())
    common = ["--preset", args.preset, "--test", args.test, "--out", str(out), "--max-new-tokens", str(args.max_new_tokens),
              "--prompt-format", args.prompt_format, "--multiples", *map(str, args.multiples), "--batch-sizes", *map(str, args.batch_sizes),
              "--prefills", *args.prefills,
              *(["--adapter", args.adapter] if args.adapter else [])]
    for repeat in range(args.repeats):
        for batch in args.batch_sizes:
            for multiple in args.multiples:
                for prefill in args.prefills:
                    run_worker("benchmarks.generate_width", ["worker", "--pad-multiple", str(multiple), "--batch-size", str(batch),
                                                             "--prefill", prefill, "--repeat", str(repeat), *common], out)


def summarize(args) -> None:
    raw = [r for r in read_records(args.results) if r["phase"] == "generate_width"]
    rows = [{
        "pad_multiple": r["pad_multiple"], "batch": r["batch_size"], "LoRA": "yes" if r.get("adapter") else "no", "repeat": r["repeat"],
        "widths": " ".join(map(str, r["widths"])),
        # Runs before lorastudy.prefill seeded the cache over the whole width.
        "first pass": r.get("prefill", "whole"), "first pass positions": r.get("prefill_positions", ""),
        "decode steps": r["decode_steps"], "compile s": f"{r['compile_seconds']:.1f}",
        "steady s": f"{r['steady_seconds']:.1f}",
        # A step decodes every row of its batch, the last batch's filler rows too.
        "ms per row-step": f"{1000 * r['steady_seconds'] / (r['decode_steps'] * r['batch_size']):.2f}",
        "answers equal": r["answers_equal_first"],
    } for r in raw]
    write_summary(Path(args.out), "generate_width", rows, raw)


def shared_arguments(p) -> None:
    p.add_argument("--preset", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[25])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-format", default="plain")
    # An adapter of the main job (results/finetune/...): its evaluation runs with LoRA enabled, as the job's does.
    p.add_argument("--adapter")
    p.add_argument("--multiples", type=int, nargs="+", default=[64, 16, 8])
    p.add_argument("--prefills", nargs="+", choices=["prompts", "whole"], default=["prompts"])


def worker_arguments(p) -> None:
    p.add_argument("--pad-multiple", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--prefill", choices=["prompts", "whole"], required=True)


def main() -> None:
    args = repeated_driver_arguments(__doc__, shared_arguments, worker_arguments)
    {"run": run, "worker": worker, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

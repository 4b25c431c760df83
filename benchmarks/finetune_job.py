"""A finetune job end to end, process start to saved adapter: ours against TRL's SFTTrainer (issue 18, item 2).

    python -m benchmarks.finetune_job prepare --work W [--model gemma_2b]
    python -m benchmarks.finetune_job run --work W --out DIR --jobs ours ours ours+packing trl:packing+compile ...
    python -m benchmarks.finetune_job summarize --results DIR/results.jsonl ... --out benchmarks/results

`prepare` writes, under W, what both sides start from: the made-up
full-size Dolly file (`lorastudy control made-up`: Dolly's length profile), the
study's own filter and split into a 1k training subset and the 200-record
validation split; a SentencePiece tokenizer trained on those records; and
one random-weight model of KerasHub's shape of `--model` (vocabulary 256k,
bfloat16 like the Kaggle presets) twice, as a KerasHub preset (ours) and as
a transformers checkpoint with the same tokenizer (the peer's).

`run` times each job as a process of its own, from its start to its exit
after the last adapter is saved: loading, tokenizing, compiling, training
two epochs and validating after each, as the study's settings for the 2B
model say (sequence 256, batch 4, lr 5e-5, LoRA rank 4). `ours` is the
finetune stage itself (`lorastudy.finetune.finetune`, its length buckets and
the JAX compilation cache in W/jax_cache: the first `ours` of a run finds it
empty, a second one warm, as every later job of a study's grid does);
`ours+packing` the same with `train.packing` (whole records packed into rows
of 256 tokens, each attending to itself; its first job also starts from an
empty cache). `+group9` trains the paper's cell as a grouped job does
(`jobs: grouped`, lorastudy.stacked): ranks 4, 8 and 16 x seeds 0-2, nine
adapters side by side on one load; its wall time over nine is a run's share,
which the summary holds against one peer job (rank 4: a LoRA rank's cost is
a rounding error beside the frozen base's).
`trl:ROUTE` is TRL's SFTTrainer with PEFT LoRA on q_proj and v_proj in
bfloat16, the prompt-completion dataset (loss on the completion only), and
one of its batchings: `padded` (to the longest in the batch), `padding_free`
(the batch's records flattened into one row, attention kept to each record
through position ids), `packing` (best-fit-decreasing bins of 256 tokens,
padding-free: four bins per step hold more records than four records do);
`+compile` adds `torch_compile=True`.
Useful tokens are the records' own tokens (no padding) times epochs.

`load` times the part of a job that dominated ours: loading the preset.
KerasHub's own `CausalLM.from_preset` against the study's `load_causal_lm`
(the same, minus the random draws that the file overwrites), alternating,
each load in a fresh process, in the dtype a job of this machine uses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.gemma_shapes import KERAS_GEMMA, hf_config
from benchmarks.harness import emit, gpu_name, run_worker, software, write_csv
from lorastudy.prompts import DEFAULT_TEMPLATE as TEMPLATE

# The paper's settings for Gemma 2B (config/paper.yaml) and a tokenizer
# whose pieces make records about as long as Gemma's tokenizer makes them.
SEQUENCE_LENGTH, BATCH_SIZE, LEARNING_RATE, RANK, EPOCHS = 256, 4, 5e-5, 4, 2
TOKENIZER_PIECES = 16000


def paths(work: Path) -> dict[str, Path]:
    return {name: work / name for name in
            ("dolly.jsonl", "filtered.jsonl", "train_1k.jsonl", "val.jsonl", "test.jsonl", "preset", "hf_model", "jax_cache")}


def prepare(args) -> None:
    import keras
    import keras_hub

    import lorastudy  # noqa: F401 - JAX as Keras's backend, a quiet start
    from lorastudy.controls import make_dolly_full_size
    from lorastudy.data import filter_context, split_dolly
    from lorastudy.io import read_jsonl
    from lorastudy.models import train_gemma_tokenizer

    work = Path(args.work)
    p = paths(work)
    work.mkdir(parents=True, exist_ok=True)
    make_dolly_full_size(p["dolly.jsonl"])
    filter_context(p["dolly.jsonl"], p["filtered.jsonl"])
    split_dolly(p["filtered.jsonl"], p["test.jsonl"], p["val.jsonl"], {"1k": p["train_1k.jsonl"]},
                work / "split_counts.csv", work / "duplicates.csv", {"1k": 1000}, seed=2024)
    texts = [t for r in read_jsonl(p["filtered.jsonl"]) for t in (r["instruction"], r["response"])]
    proto = train_gemma_tokenizer(texts, TOKENIZER_PIECES)
    shape = KERAS_GEMMA[args.model]
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
    if tokenizer.vocabulary_size() > shape["vocabulary_size"]:
        raise ValueError(f"--model {args.model}: its vocabulary ({shape['vocabulary_size']}) is smaller than the tokenizer's ({tokenizer.vocabulary_size()})")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(**shape, dtype="bfloat16")
    preprocessor = keras_hub.models.CausalLMPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
    keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(p["preset"]))
    del backbone
    save_peer_model(args.model, proto, p["hf_model"])


def save_peer_model(model: str, proto: bytes, dest: Path) -> None:
    """The peer's checkpoint: transformers' Gemma of the same shape in bfloat16, and the same tokenizer."""
    import torch
    import transformers

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(proto)
    tokenizer = transformers.GemmaTokenizer.from_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config(model), dtype=torch.bfloat16).save_pretrained(str(dest))


# --------------------------------------------------------------------------
# the jobs, each in a process of its own
# --------------------------------------------------------------------------


def ours_job(args) -> dict:
    import lorastudy  # noqa: F401
    from lorastudy.finetune import finetune

    p, out = paths(Path(args.work)), Path(args.run_dir)
    _, *extras = args.route.split("+")
    settings = dict(sequence_length=SEQUENCE_LENGTH, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                    expected_tokens_per_second="auto", compile_seconds_per_width="auto", packing="packing" in extras)
    cache = {"dir": str(p["jax_cache"])}
    if "group9" in extras:
        return ours_group(p, out, settings, cache)
    stats = finetune(
        p["preset"], p["train_1k.jsonl"], p["val.jsonl"], [out / f"adapter_epoch{e}.lora.h5" for e in range(1, EPOCHS + 1)],
        out / "history.csv", out / "train.json", rank=RANK, template=TEMPLATE, settings=settings, compilation_cache=cache,
    )
    return dict(runs=1, useful_tokens=stats["tokens_seen"], steps=stats["steps"], load_s=stats["load_seconds_this_run"],
                compile_s=stats.get("train_compile_seconds"), steady_tokens_per_s=stats["steady_tokens_per_second"],
                peak_bytes=stats["peak_device_memory_bytes"], batch_widths=stats["batch_widths"])


def ours_group(p: dict[str, Path], out: Path, settings: dict, cache: dict) -> dict:
    """The grid's cell as a grouped job trains it: ranks 4, 8 and 16 x seeds 0-2 (config/paper.yaml), side by side."""
    from lorastudy.stacked import GroupRun, finetune_group

    runs = []
    for rank in (4, 8, 16):
        for seed in range(3):
            d = out / f"r{rank}_s{seed}"
            d.mkdir(parents=True, exist_ok=True)
            runs.append(GroupRun(d.name, rank, seed, tuple(str(d / f"adapter_epoch{e}.lora.h5") for e in range(1, EPOCHS + 1)),
                                 str(d / "history.csv"), str(d / "train.json")))
    stats = finetune_group(p["preset"], p["train_1k.jsonl"], p["val.jsonl"], runs, TEMPLATE, out / "checkpoints",
                           settings=settings, compilation_cache=cache)
    first = stats[0]
    return dict(runs=len(runs), useful_tokens=sum(s["tokens_seen"] for s in stats), steps=first["steps"],
                load_s=first["load_seconds_this_run"], compile_s=first["wave_seconds"]["train_compile_seconds"],
                steady_tokens_per_s=first["steady_tokens_per_second"] * len(runs), peak_bytes=first["peak_device_memory_bytes"],
                batch_widths=first["batch_widths"])


def trl_job(args) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from lorastudy.io import read_jsonl
    from lorastudy.prompts import PromptTemplate

    p, out = paths(Path(args.work)), Path(args.run_dir)
    # route+extra+...: compile (torch.compile), nockpt (gradient checkpointing off, SFTConfig's default
    # being on: the faster setting when memory allows, so the strongest peer), liger (Liger kernels).
    route, *extras = args.route.split("+")
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(p["hf_model"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p["hf_model"]), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    template = PromptTemplate(TEMPLATE)

    def dataset(path: Path):
        # Prompt-completion records: TRL trains on the completion only, as the study does.
        return datasets.Dataset.from_list([{"prompt": template.prompt(r["instruction"]), "completion": r["response"]} for r in read_jsonl(path)])

    config = trl.SFTConfig(
        output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE, weight_decay=0.01, lr_scheduler_type="constant", bf16=torch.cuda.is_available(),
        max_length=SEQUENCE_LENGTH, padding_free=route == "padding_free", packing=route == "packing",
        torch_compile="compile" in extras, gradient_checkpointing="nockpt" not in extras, use_liger_kernel="liger" in extras,
        eval_strategy="epoch", save_strategy="epoch", save_only_model=True,
        logging_steps=10, report_to="none", dataloader_num_workers=0, seed=0,
    )
    if route == "padding_free":
        config.max_length = None  # TRL asks for it: records are cut to the sequence length below
    lora = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    train, val = dataset(p["train_1k.jsonl"]), dataset(p["val.jsonl"])
    if route == "padding_free":
        train, val = (truncated(tokenizer, d) for d in (train, val))
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=val, processing_class=tokenizer, peft_config=lora)
    load_s = time.perf_counter() - started
    result = trainer.train()
    # Packed rows hold whole records and no padding, so every route counts its rows' lengths.
    useful = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    return dict(useful_tokens=useful * EPOCHS, steps=result.global_step, load_s=load_s, final_loss=result.training_loss,
                peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)


def truncated(tokenizer, data):
    """Records tokenized as TRL would and cut to the sequence length (padding-free does not cut them)."""

    def cut(record):
        prompt = tokenizer(record["prompt"])["input_ids"]
        ids = tokenizer(record["prompt"] + record["completion"])["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": ids[:SEQUENCE_LENGTH], "completion_mask": ([0] * len(prompt) + [1] * (len(ids) - len(prompt)))[:SEQUENCE_LENGTH]}

    return data.map(cut, remove_columns=data.column_names)


def job(args) -> None:
    """One job, in this process: the driver times it from outside; this adds what only the job knows."""
    started = time.perf_counter()
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    detail = ours_job(args) if args.route.startswith("ours") else trl_job(args)
    detail["inside_s"] = time.perf_counter() - started
    Path(args.run_dir, "job.json").write_text(json.dumps(detail))


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", gpu=gpu_name(), python=sys.version.split()[0], software={**software(), **trl_version()}, jobs=args.jobs)
    for i, route in enumerate(args.jobs):
        name = route.removeprefix("trl:")
        if route.startswith("ours") and route not in args.jobs[:i]:
            # The first job of each of our batchings compiles its programs from nothing.
            shutil.rmtree(paths(Path(args.work))["jax_cache"], ignore_errors=True)
        run_dir = Path(args.work) / "runs" / f"{i}_{route.replace(':', '_').replace('+', '_')}"
        done, wall_s = run_worker("benchmarks.finetune_job", ["job", "--work", args.work, "--route", name, "--run-dir", str(run_dir)], out,
                                  timeout=args.job_timeout, TOKENIZERS_PARALLELISM="false")
        adapters = sorted(str(a.relative_to(run_dir)) for a in run_dir.rglob("*") if a.name == "adapter_model.safetensors" or a.suffix == ".h5")
        record = dict(phase="job", framework=route.replace("trl:", "trl ").replace("+", " "), model=args.model, route=route,
                      exit=done.returncode, wall_s=wall_s, adapters=adapters, gpu=gpu_name())
        if done.returncode:
            emit(out, **record)
            continue
        detail = json.loads((run_dir / "job.json").read_text())
        emit(out, **record, **detail, useful_tokens_per_s=detail["useful_tokens"] / wall_s)


def load_one(args) -> None:
    """One load in this process; prints its seconds."""
    import lorastudy  # noqa: F401
    from lorastudy.presets import dtype_policies, load_causal_lm

    dtype = dtype_policies("auto", training=True)[0]
    if args.loader.startswith("ours+cache"):
        # The persistent compilation cache with every program in it (min 0 s) or only the slow ones (JAX's own 1 s).
        from lorastudy.compilation import use_compilation_cache

        floor = 0.0 if args.loader == "ours+cache0" else 1.0
        use_compilation_cache({"dir": str(Path(args.out_cache) / args.loader), "min_compile_seconds": floor})
    started = time.perf_counter()
    if args.loader.startswith("ours"):
        load_causal_lm(args.preset, dtype=dtype)
    else:
        import keras_hub

        keras_hub.models.CausalLM.from_preset(args.preset, dtype=dtype)
    print(json.dumps({"load_s": time.perf_counter() - started, "dtype": dtype}))


# KerasHub's own load; ours; ours with a persistent compilation cache of every program or of the slow ones
# (their first repeat fills it: the later ones are what a job of a grid sees).
LOADERS = ("kerashub", "ours", "ours+cache0", "ours+cache1")


def load(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, phase="environment", gpu=gpu_name(), python=sys.version.split()[0], software=software())
    for repeat in range(args.repeats):
        for loader in LOADERS:
            worker = ["load-one", "--preset", args.preset, "--loader", loader, "--out-cache", str(out / "caches")]
            done, seconds = run_worker("benchmarks.finetune_job", worker, out)
            done.check_returncode()
            emit(out, phase="load", loader=loader, preset=args.preset, repeat=repeat, process_s=seconds,
                 **json.loads(done.stdout.strip().splitlines()[-1]), gpu=gpu_name())


def trl_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"trl": version("trl"), "datasets": version("datasets")}
    except PackageNotFoundError:
        return {"trl": "absent"}


def summarize(args) -> None:
    """benchmarks/results/finetune_job.{csv,json,md}: each job's wall time against the run's strongest peer (its fastest TRL job)."""
    records, environments = [], {}
    for path in args.results:
        for line in open(path):
            r = {**json.loads(line), "run": Path(path).stem}
            if r["phase"] == "environment":
                environments[r["run"]] = r
            else:
                records.append(r)
    rows = [label(r, records) for r in records if r["phase"] == "job" and r["exit"] == 0]
    # A grouped job trains several runs: its share per run is what one of the peer's jobs is measured against.
    lines = ["| run | job | runs | wall s | per run s | load s | optimizer steps | useful tokens/s | over the strongest peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    table, strongest = [], {}
    for r in sorted((r for r in rows if r["framework"].startswith("trl")), key=lambda r: -r["wall_s"]):
        strongest[r["run"]] = r  # the fastest finished TRL job of each run
    for r in rows:
        if r["run"] not in strongest:
            continue
        peer, runs = strongest[r["run"]], r.get("runs", 1)
        per_run = r["wall_s"] / runs
        table.append({k: v for k, v in r.items() if k not in ("adapters", "batch_widths")}
                     | {"strongest_peer": peer["framework"], "per_run_s": per_run, "speedup_over_strongest_peer": peer["wall_s"] / per_run})
        lines.append(f"| {r['run']} | {r['framework']} | {runs} | {r['wall_s']:.1f} | {per_run:.1f} | {r['load_s']:.1f} | {r['steps']} | "
                     f"{r['useful_tokens_per_s']:,.0f} | {peer['wall_s'] / per_run:.2f}x ({peer['framework']}) |")
    for r in records:
        if r["phase"] == "job" and r["exit"] == 124:
            lines.append(f"| {r['run']} | {r['framework']} | - | killed unfinished after {r['wall_s']:.0f} | - | - | - | - | - |")
    lines += ["", "| preset loaded (run) | device | KerasHub from_preset s | load_causal_lm s | + cache of every program s | "
              "+ cache of the slow ones s | speed-up |", "|---|---|---|---|---|---|---|"]
    loads = [r for r in records if r["phase"] == "load"]
    for run in dict.fromkeys(r["run"] for r in loads):
        # The cached loaders' first repeat fills their cache: the median of the later ones is what a grid's job sees.
        def median(loader):
            seen = [r["load_s"] for r in loads if r["run"] == run and r["loader"] == loader and (r["repeat"] or "cache" not in loader)]
            return statistics.median(seen) if seen else float("nan")

        seconds = {k: median(k) for k in LOADERS}
        device = next(r["gpu"] for r in loads if r["run"] == run)
        best = min(v for k, v in seconds.items() if k != "kerashub" and v == v)
        lines.append(f"| {run} | {'CPU' if device == 'unknown' else device} | " + " | ".join(f"{v:.1f}" for v in seconds.values())
                     + f" | {seconds['kerashub'] / best:.2f}x |")
    out = Path(args.out)
    write_csv(out / "finetune_job.csv", table)
    (out / "finetune_job.json").write_text(json.dumps({"environments": environments, "records": records}, indent=1) + "\n")
    (out / "finetune_job.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def label(job: dict, records: list[dict]) -> dict:
    """A job's framework, with the state of the compilation cache it found if it is one of ours."""
    name = job["framework"]
    if not name.startswith("ours"):
        return job
    same = [r for r in records if r["phase"] == "job" and r["run"] == job["run"] and r["framework"] == name]
    return {**job, "framework": f"{name}, {'empty' if job is same[0] else 'warm'} cache"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p.add_argument("--model", default="gemma_2b", choices=list(KERAS_GEMMA))
    p = sub.add_parser("run")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="gemma_2b")
    p.add_argument("--jobs", nargs="+", required=True, help="ours, ours+packing, or trl:ROUTE[+compile] with ROUTE padded, padding_free or packing")
    p.add_argument("--job-timeout", type=float, help="seconds after which a job is killed and recorded as unfinished (exit 124)")
    p = sub.add_parser("job")
    p.add_argument("--work", required=True)
    p.add_argument("--route", required=True)
    p.add_argument("--run-dir", required=True)
    p = sub.add_parser("load")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("load-one")
    p.add_argument("--preset", required=True)
    p.add_argument("--loader", choices=LOADERS, required=True)
    p.add_argument("--out-cache", required=True)
    p = sub.add_parser("summarize")
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"prepare": prepare, "run": run, "job": job, "load": load, "load-one": load_one, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()

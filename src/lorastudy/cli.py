"""Command line: ask a model a question, before or after fine-tuning.

    lorastudy ask --model results/models/gemma3_270m_q4km/preset "Name three rivers."
    lorastudy ask --model results/models/gemma3_270m_q4km/preset \\
        --adapter results/finetune/gemma3_270m_q4km/1k_r4_s0/adapter_epoch2.lora.h5 "Name three rivers."

Write a positive or negative control dataset (lorastudy.controls), or made-up
data of Dolly's size and length profile (to time the study or try it offline;
its scores mean nothing), to run the study on in place of Dolly:

    lorastudy control positive positive_control.jsonl
    snakemake --cores all --configfile config/config.yaml positive_control.yaml

Count the GPUs for Snakemake's GPU cap, one job per GPU:

    snakemake --profile profiles/default --resources gpu=$(lorastudy gpus)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorastudy.prompts import DEFAULT_TEMPLATE, PromptTemplate, template_for


def ask(args: argparse.Namespace) -> str:
    from lorastudy.generate import GenerateSettings, Generator, detokenize, load_for_generation, prompt_token_ids
    from lorastudy.presets import architecture

    settings = GenerateSettings(
        batch_size=1,
        devices=1,
        max_new_tokens=args.max_new_tokens,
        sampler=args.sampler,
        top_k=args.top_k,
        seed=args.seed,
    )
    causal_lm = load_for_generation(args.model, args.adapter, settings=settings, quantize=args.quantize)
    tokenizer = causal_lm.preprocessor.tokenizer
    template = PromptTemplate(template_for("chat", architecture(causal_lm.backbone)) if args.chat else args.template)
    (out,) = Generator.for_task(causal_lm, settings, template)(prompt_token_ids(tokenizer, [template.prompt(args.prompt)]))
    return detokenize(tokenizer, out["new_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorastudy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("ask", help="answer one instruction with a model, optionally with a LoRA adapter")
    p.add_argument("prompt", help="the instruction, as a Dolly record's instruction")
    p.add_argument("--model", required=True, help="a prepared preset directory (results/models/<name>/preset) or a KerasHub preset")
    p.add_argument("--adapter", help="an adapter_epoch<e>.lora.h5 written by the finetune stage")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="the prompt template the adapter was trained with")
    p.add_argument("--chat", action="store_true", help="Gemma's chat turns (prompt.format: chat), for instruction-tuned models")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sampler", choices=["greedy", "top_k"], default="greedy")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none", help="the base quantized as the adapter was trained on it (train.quantize)")
    p = commands.add_parser("control", help="write a positive or negative control, or made-up data of Dolly's size, in Dolly's shape")
    p.add_argument("kind", choices=["positive", "negative", "made-up"])
    p.add_argument("out", help="the JSON Lines file to write")
    # The default subsets (data.subsets: up to 5k, and "15k", the rest) need 5,000 records besides the held-out ones.
    p.add_argument("--records", type=int, help="how many records (default: 6000 for a control, every default subset; 15,011 made up)")
    p.add_argument("--seed", type=int, default=0)
    commands.add_parser("gpus", help="how many GPUs this process may use (for snakemake --resources gpu=N)")
    p = commands.add_parser("config-keys", help="every config key, its default and description, from the schema (a Markdown table)")
    p.add_argument("--write", metavar="README", help="replace the table in this file (config/README.md) instead of printing it")
    args = parser.parse_args(argv)
    if args.command == "gpus":
        from lorastudy.gpus import visible_gpus

        print(len(visible_gpus()))
    elif args.command == "config-keys":
        from lorastudy.config import keys_markdown, load_schema, write_keys

        schema = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
        if args.write:
            print(f"{args.write}: {'updated' if write_keys(args.write, schema) else 'already up to date'}")
        else:
            print(keys_markdown(load_schema(schema)))
    elif args.command == "control":
        from lorastudy.controls import write_control

        overlay = write_control(args.kind, args.out, args.records, args.seed)
        print(f"wrote {args.out} and {overlay}; run the study on it with:\n"
              f"  snakemake --cores all --configfile config/config.yaml {overlay}")
    else:
        print(ask(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The generate stage: answers to the held-out test prompts, with or without an adapter.

Prompts are the shared template up to the response, tokenized exactly as in
training. They are generated in batches of similar length with KerasHub's
`CausalLM.generate` (its compiled, cached decoding loop and samplers), each
batch padded to one of a few widths so that XLA compiles few programs.
Generation stops at `<eos>` or after `max_new_tokens`; greedy decoding by
default, so results are reproducible.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorastudy.io import read_jsonl, write_json, write_jsonl
from lorastudy.lora import load_adapter
from lorastudy.models import dtype_policies, load_causal_lm
from lorastudy.prompts import PromptTemplate
from lorastudy.tokens import round_up, token_lists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateSettings:
    """The `generate` section of the config (see the schema for each key)."""

    batch_size: int = 16
    max_new_tokens: int = 128
    sampler: str = "greedy"
    top_k: int = 5
    temperature: float = 1.0
    seed: int = 0
    precision: str = "auto"
    pad_multiple: int = 64


def make_sampler(settings: GenerateSettings):
    import keras_hub

    if settings.sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    if settings.sampler == "top_k":
        return keras_hub.samplers.TopKSampler(k=settings.top_k, seed=settings.seed, temperature=settings.temperature)
    raise ValueError(f"generate.sampler must be 'greedy' or 'top_k', got {settings.sampler!r}")


def load_for_generation(
    preset: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    rank: int | None = None,
    settings: GenerateSettings | None = None,
):
    """The task with its sampler, and with the LoRA adapter loaded if one is given.

    With `rank`, an adapter file of another rank fails with a message naming
    the file and both ranks.
    """
    settings = settings or GenerateSettings()
    causal_lm = load_causal_lm(preset, dtype=dtype_policies(settings.precision, training=False)[0])
    if adapter is not None:
        load_adapter(causal_lm.backbone, adapter, expected_rank=rank)
    causal_lm.compile(sampler=make_sampler(settings))
    return causal_lm


class Generator:
    """Batched generation over token ids, for a task loaded by `load_for_generation`.

    Args:
        causal_lm: a KerasHub CausalLM.
        settings: batch size, new-token limit, padding multiple.
        end_token_id: generation of a row stops at this token.
        pad_token_id: fills batches beyond each prompt.
    """

    def __init__(self, causal_lm, settings: GenerateSettings, end_token_id: int, pad_token_id: int):
        self.settings = settings
        self.end_token_id, self.pad_token_id = end_token_id, pad_token_id
        # KerasHub's compiled generation loop, called on token ids directly: the
        # tokens are prepared here, as in training, and `CausalLM.generate`
        # would only wrap pre- and post-processing around this same function.
        self.generate_function = causal_lm.make_generate_function()

    @classmethod
    def for_task(cls, causal_lm, settings: GenerateSettings) -> "Generator":
        tokenizer = causal_lm.preprocessor.tokenizer
        return cls(causal_lm, settings, tokenizer.end_token_id, tokenizer.pad_token_id)

    def __call__(self, prompt_ids: Sequence[list[int]]) -> list[dict[str, Any]]:
        """Generate for every prompt; returns, in input order, new token ids and whether <eos> ended them."""
        s = self.settings
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        results: list[dict[str, Any]] = [{}] * len(prompt_ids)
        for start in range(0, len(order), s.batch_size):
            batch = order[start : start + s.batch_size]
            rows = [prompt_ids[i] for i in batch]
            # Fill the last batch with copies, so that every batch has one shape.
            rows += [rows[0]] * (s.batch_size - len(rows))
            width = round_up(max(len(r) for r in rows) + s.max_new_tokens, s.pad_multiple)
            for i, out in zip(batch, self._generate(rows, width)):
                results[i] = out
        return results

    def _generate(self, rows: list[list[int]], width: int) -> list[dict[str, Any]]:
        eos = self.end_token_id
        token_ids = np.full((len(rows), width), self.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), width), bool)
        for r, ids in enumerate(rows):
            token_ids[r, : len(ids)] = ids
            padding_mask[r, : len(ids)] = True
        output = self.generate_function({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=(eos,))
        generated = np.asarray(output["token_ids"])
        results = []
        for r, ids in enumerate(rows):
            new = generated[r, len(ids) : len(ids) + self.settings.max_new_tokens].tolist()
            stopped = eos in new
            results.append({"new_ids": new[: new.index(eos)] if stopped else new, "stopped": stopped})
        return results


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """`<bos>` and the prompt's tokens, as in training."""
    return [[tokenizer.start_token_id, *ids] for ids in token_lists(tokenizer, prompts)]


def detokenize(tokenizer, ids: list[int]) -> str:
    return str(tokenizer.detokenize([ids])[0]) if ids else ""


def generate(
    preset: str | os.PathLike,
    test_path: str | os.PathLike,
    out_path: str | os.PathLike,
    stats_path: str | os.PathLike,
    template: str,
    adapter: str | os.PathLike | None = None,
    rank: int | None = None,
    settings: dict[str, Any] | GenerateSettings | None = None,
) -> dict[str, Any]:
    """Answer every test prompt; write one JSON line per record and timing stats."""
    s = settings if isinstance(settings, GenerateSettings) else GenerateSettings(**(settings or {}))
    records = read_jsonl(test_path)
    prompt = PromptTemplate(template)
    prompts = [prompt.prompt(r["instruction"]) for r in records]
    causal_lm = load_for_generation(preset, adapter, rank, s)
    tokenizer = causal_lm.preprocessor.tokenizer
    generator = Generator.for_task(causal_lm, s)
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    started = time.perf_counter()
    outputs = generator(prompt_ids)
    seconds = time.perf_counter() - started
    rows = [
        {
            "id": record["id"],
            "category": record["category"],
            "prompt": text,
            "reference": record["response"],
            "prediction": detokenize(tokenizer, out["new_ids"]),
            "prompt_tokens": len(ids),
            "new_tokens": len(out["new_ids"]),
            "stopped_at_eos": out["stopped"],
        }
        for record, text, ids, out in zip(records, prompts, prompt_ids, outputs)
    ]
    write_jsonl(out_path, rows)
    new_tokens = sum(r["new_tokens"] for r in rows)
    stats = {
        "preset": str(preset),
        "adapter": None if adapter is None else str(adapter),
        "prompts": len(rows),
        "batch_size": s.batch_size,
        "sampler": s.sampler,
        "max_new_tokens": s.max_new_tokens,
        "new_tokens": new_tokens,
        "stopped_at_eos": sum(r["stopped_at_eos"] for r in rows),
        # Includes XLA compilation of each batch shape, as a user would wait for it.
        "seconds": seconds,
        "new_tokens_per_second": new_tokens / seconds if seconds else None,
    }
    write_json(stats_path, stats)
    log.info("generated %s", stats)
    return stats

"""The generate stage: answers to the held-out test prompts, with or without an adapter.

Prompts are the shared template up to the response, tokenized exactly as in
training. They are generated in batches of similar length with KerasHub's
`CausalLM.generate` (its compiled, cached decoding loop and samplers), each
batch padded to one of a few widths so that XLA compiles few programs.
Generation stops at `<eos>` or after `max_new_tokens`; greedy decoding by
default, so results are reproducible.

One job answers for every epoch of a finetune run: the model is loaded and
compiled once, and each epoch's adapter is loaded into the same variables.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorastudy.answer_batch import answer_batches, resolve_batch_size
from lorastudy.compilation import CompileClock, Spent, use_compilation_cache
from lorastudy.distribution import distributed, shard_batch
from lorastudy.io import read_jsonl, write_json, write_jsonl
from lorastudy.lora import AdapterError, LoraSpec, enable_lora, load_padded_adapter, lora_layers, read_spec, set_factors
from lorastudy.prefill import prefill_prompts_only
from lorastudy.presets import attention_heads, dtype_policies, load_causal_lm, quantize_base
from lorastudy.prompts import PromptTemplate
from lorastudy.tokens import token_lists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateSettings:
    """The `generate` section of the config (see the schema for each key)."""

    batch_size: int | str = "auto"
    max_new_tokens: int = 128
    protocol: str = "greedy"
    sampler: str = "greedy"
    top_k: int = 5
    temperature: float = 1.0
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    max_prompt_tokens: int | None = None
    precision: str = "auto"
    pad_multiple: int = 8
    devices: int | str = "all"
    model_parallel: int = 1

    def __post_init__(self):
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def answer_seeds(self) -> tuple[int | None, ...]:
        """One answer per generation seed; greedy decoding needs none."""
        if self.sampler == "greedy":
            return (None,)
        return self.seeds or (self.seed,)


def make_sampler(settings: GenerateSettings):
    import keras_hub

    if settings.sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    if settings.sampler == "top_k":
        return keras_hub.samplers.TopKSampler(k=settings.top_k, seed=settings.seed, temperature=settings.temperature)
    if settings.sampler == "random":
        return keras_hub.samplers.RandomSampler(seed=settings.seed, temperature=settings.temperature)
    raise ValueError(f"generate.sampler must be 'greedy', 'top_k' or 'random', got {settings.sampler!r}")


def load_for_generation(
    preset: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    rank: int | None = None,
    settings: GenerateSettings | None = None,
    quantize: str = "none",
):
    """The task with its sampler, and with the LoRA adapter loaded if one is given (on the base quantized as `quantize`).

    With `rank`, an adapter file of another rank fails with a message naming
    the file and both ranks.
    """
    causal_lm = load_with_lora_for(preset, [] if adapter is None else [adapter], rank, settings or GenerateSettings(), quantize)
    use_adapter(causal_lm.backbone, adapter)
    return causal_lm


class Generator:
    """Batched generation over token ids, for a task loaded by `load_for_generation`.

    Args:
        causal_lm: a KerasHub CausalLM.
        settings: batch size, new-token limit, padding multiple.
        stop_token_ids: generation of a row stops at any of these tokens.
        pad_token_id: fills batches beyond each prompt.
    """

    def __init__(self, causal_lm, settings: GenerateSettings, stop_token_ids: Sequence[int], pad_token_id: int):
        self.settings = settings
        self.stop_token_ids, self.pad_token_id = tuple(stop_token_ids), pad_token_id
        # KerasHub's compiled generation loop, called on token ids directly: the
        # tokens are prepared here, as in training, and `CausalLM.generate`
        # would only wrap pre- and post-processing around this same function.
        self.generate_function = causal_lm.make_generate_function()
        self.causal_lm = causal_lm
        # A seeded sampler's state advances as it draws; each call starts it
        # afresh, so that answers do not depend on what was generated before.
        self.sampler_variables = causal_lm.sampler.variables
        self.sampler_start = [np.array(v.value) for v in self.sampler_variables]
        seed_generator = getattr(causal_lm.sampler, "seed_generator", None)
        self.seed_state = None if seed_generator is None else seed_generator.state
        import keras

        # Under data parallelism each device answers its slice of every batch.
        self.distribution = keras.distribution.distribution()

    @classmethod
    def for_task(cls, causal_lm, settings: GenerateSettings, template: PromptTemplate) -> "Generator":
        tokenizer = causal_lm.preprocessor.tokenizer
        return cls(causal_lm, settings, stop_token_ids(tokenizer, template), tokenizer.pad_token_id)

    def __call__(self, prompt_ids: Sequence[list[int]], seed: int | None = None) -> list[dict[str, Any]]:
        """Generate for every prompt; returns, in input order, new token ids and whether a stop token ended them.

        `seed` restarts a seeded sampler as `keras.random.SeedGenerator(seed)`
        starts (state [seed, 0]), so each seed reuses the compiled program and
        answers as a sampler built with that seed would.
        """
        s = self.settings
        for variable, value in zip(self.sampler_variables, self.sampler_start):
            variable.assign(value)
        if seed is not None and self.seed_state is not None:
            self.seed_state.assign(np.array([seed, 0], self.seed_state.dtype))
        results: list[dict[str, Any]] = [{}] * len(prompt_ids)
        for batch, width in answer_batches(prompt_ids, s.batch_size, s.max_new_tokens, s.pad_multiple):
            rows = [prompt_ids[i] for i in batch]
            # Fill the last batch with copies, so that every batch has one shape.
            rows += [rows[0]] * (s.batch_size - len(rows))
            for i, out in zip(batch, self._generate(rows, width)):
                results[i] = out
        return results

    def _generate(self, rows: list[list[int]], width: int) -> list[dict[str, Any]]:
        token_ids = np.full((len(rows), width), self.pad_token_id, "int32")
        padding_mask = np.zeros((len(rows), width), bool)
        for r, ids in enumerate(rows):
            token_ids[r, : len(ids)] = ids
            padding_mask[r, : len(ids)] = True
        inputs = shard_batch({"token_ids": token_ids, "padding_mask": padding_mask}, self.distribution)
        # Traced (at a new width) within: its cache-seeding pass skips the new tokens' positions.
        with prefill_prompts_only(self.causal_lm, self.settings.max_new_tokens):
            output = self.generate_function(inputs, stop_token_ids=self.stop_token_ids)
        generated = np.asarray(output["token_ids"])
        results = []
        for r, ids in enumerate(rows):
            new = generated[r, len(ids) : len(ids) + self.settings.max_new_tokens].tolist()
            stop = next((t for t, token in enumerate(new) if token in self.stop_token_ids), None)
            results.append({"new_ids": new if stop is None else new[:stop], "stopped": stop is not None})
        return results


def stop_token_ids(tokenizer, template: PromptTemplate) -> tuple[int, ...]:
    """`<eos>`, and the token that closes a response in the template's format (chat: `<end_of_turn>`)."""
    if not template.end:
        return (tokenizer.end_token_id,)
    end = token_lists(tokenizer, [template.end])[0]
    if len(end) != 1:
        raise ValueError(
            f"prompt.template: the text after {{response}}, {template.end!r}, must be one token of the "
            "model's tokenizer (as Gemma's <end_of_turn> is), so that generation stops at it"
        )
    return (tokenizer.end_token_id, end[0])


def prompt_token_ids(tokenizer, prompts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """`<bos>` and the prompt's tokens, as in training; over `max_tokens`, `<bos>` and the last ones."""
    ids = [[tokenizer.start_token_id, *ids] for ids in token_lists(tokenizer, prompts)]
    return ids if max_tokens is None else [keep_last(row, max_tokens) for row in ids]


def keep_last(row: list[int], max_tokens: int) -> list[int]:
    """A prompt over `max_tokens`: its first token (`<bos>`) and its last ones."""
    return row if len(row) <= max_tokens else [row[0], *row[len(row) - max_tokens + 1 :]]


def detokenize(tokenizer, ids: list[int]) -> str:
    return str(tokenizer.detokenize([ids])[0]) if ids else ""


def generate(
    preset: str | os.PathLike,
    test_path: str | os.PathLike,
    out_paths: Sequence[str | os.PathLike],
    stats_paths: Sequence[str | os.PathLike],
    template: str,
    adapters: Sequence[str | os.PathLike] = (),
    rank: int | None = None,
    settings: dict[str, Any] | GenerateSettings | None = None,
    compilation_cache: dict[str, Any] | None = None,
    include_base: bool = False,
    quantize: str = "none",
) -> list[dict[str, Any]]:
    """Answer every test prompt with the base model and with each adapter in turn.

    The model is loaded and its generation program compiled once. LoRA is
    enabled once, at the largest rank among the adapters; each adapter is
    loaded zero-padded into those variables (`load_padded_adapter`) and the
    base is the same variables at zero, so one compiled program answers for
    every run: every epoch, rank and seed of a group. Run i writes one JSON
    line per record to `out_paths[i]` and its timing to `stats_paths[i]`;
    the runs are the base (first, when `include_base` or without adapters),
    then `adapters` in order. With `rank`, an adapter of another rank fails,
    naming the file and both ranks. `quantize` is the base's quantization as
    its adapters were trained on it (`train.quantize`).
    """
    started = time.perf_counter()
    s = settings if isinstance(settings, GenerateSettings) else GenerateSettings(**(settings or {}))
    fixed_batch = None if s.batch_size == "auto" else s.batch_size
    with distributed(s.devices, s.model_parallel, fixed_batch, attention_heads(preset)):
        runs = ([None] if include_base or not adapters else []) + list(adapters)
        if len(out_paths) != len(runs) or len(stats_paths) != len(runs):
            raise ValueError(f"{len(runs)} runs to answer, but {len(out_paths)} output and {len(stats_paths)} stats paths")
        job = [_Answering(run, out, stats) for run, out, stats in zip(runs, out_paths, stats_paths)]
        return _generate_all(preset, test_path, template, job, rank, s, quantize, compilation_cache, started)


@dataclass(frozen=True)
class _Answering:
    """One run of an evaluation job: its adapter (None: the base) and the files its answers and timing go to."""

    adapter: str | os.PathLike | None
    out_path: str | os.PathLike
    stats_path: str | os.PathLike


def _generate_all(
    preset: str | os.PathLike, test_path: str | os.PathLike, template: str, job: Sequence[_Answering], rank: int | None,
    s: GenerateSettings, quantize: str, compilation_cache: dict[str, Any] | None, started: float,
) -> list[dict[str, Any]]:
    use_compilation_cache(compilation_cache)
    clock = CompileClock.get()
    runs = [answering.adapter for answering in job]
    records = read_jsonl(test_path)
    prompt = PromptTemplate(template)
    prompts = [prompt.prompt(r["instruction"]) for r in records]
    causal_lm = load_with_lora_for(preset, [run for run in runs if run is not None], rank, s, quantize)
    tokenizer = causal_lm.preprocessor.tokenizer
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    truncated = 0
    if s.max_prompt_tokens is not None:
        truncated = sum(len(row) > s.max_prompt_tokens for row in prompt_ids)
        prompt_ids = [keep_last(row, s.max_prompt_tokens) for row in prompt_ids]
    batch_size = resolve_batch_size(s.batch_size, causal_lm.backbone, prompt_ids, s.max_new_tokens, s.pad_multiple)
    s = dataclasses.replace(s, batch_size=batch_size)
    log.info("answering %d prompts in batches of %d for %d runs", len(prompt_ids), s.batch_size, len(runs))
    load_seconds = time.perf_counter() - started
    common = {"quantize": quantize, "batch_size": s.batch_size, "protocol": s.protocol, "sampler": s.sampler,
              "answer_seeds": list(s.answer_seeds), "max_new_tokens": s.max_new_tokens, "prompts_truncated": truncated,
              # Loading the model is shared by every run of the job; compilation
              # falls to the first run at each batch shape (or the persistent cache).
              "runs_in_job": len(runs), "load_seconds": load_seconds}
    write = functools.partial(_write_answers, preset, records, prompts, prompt_ids, tokenizer, common)
    written, generator, scale = [], None, None
    # A run's answers are detokenized and written on a thread while the next run
    # generates: done in between, they left the GPU waiting (about 0.3 s a run).
    with ThreadPoolExecutor(1, thread_name_prefix="answers") as writer:
        for answering in job:
            run = answering.adapter
            run_scale = use_adapter(causal_lm.backbone, run)
            if generator is None or run_scale != scale:
                # LoRA's scale is a constant of the compiled program: a new scale, a new program.
                causal_lm.generate_function = None
                generator, scale = Generator.for_task(causal_lm, s, prompt), run_scale
            with clock.region() as compiled:
                run_started = time.perf_counter()
                outputs = [generator(prompt_ids, seed) for seed in s.answer_seeds]
                seconds = time.perf_counter() - run_started
            if written:
                written[-1].result()  # a failed write stops the job here
            written.append(writer.submit(write, answering, outputs, seconds, compiled))
    return [future.result() for future in written]


def _write_answers(
    preset, records, prompts, prompt_ids, tokenizer, common: dict[str, Any], answering: _Answering, outputs, seconds: float,
    compiled: Spent,
) -> dict[str, Any]:
    """One run's answer file and timing file; its statistics."""
    rows = answer_rows(records, prompts, prompt_ids, outputs, tokenizer)
    write_jsonl(answering.out_path, rows)
    run = answering.adapter
    stats = {
        "preset": str(preset),
        "adapter": None if run is None else str(run),
        "prompts": len(rows),
        **common,
        "stopped_at_eos": sum(r["stopped_at_eos"] for r in rows),
        **timing(sum(sum(r.get("new_tokens_per_seed", [r["new_tokens"]])) for r in rows), seconds, compiled),
    }
    write_json(answering.stats_path, stats)
    log.info("generated %s", stats)
    return stats


def load_with_lora_for(
    preset: str | os.PathLike, adapters: Sequence[str | os.PathLike], rank: int | None, settings: GenerateSettings, quantize: str = "none",
):
    """The task with its sampler and, for adapters, LoRA enabled once at their largest rank on their layers.

    Every adapter is checked before the model loads: each names its file
    when its rank is not `rank` (if given) or its layers differ from the first's.
    """
    specs = [read_spec(path) for path in adapters]
    for path, spec in zip(adapters, specs):
        if rank is not None and spec.rank != rank:
            raise AdapterError(f"adapter {path} has LoRA rank {spec.rank}, but rank {rank} was asked for; both ranks must match")
        if sorted(spec.targets) != sorted(specs[0].targets):
            raise AdapterError(f"adapter {path} adapts {list(spec.targets)}, but {adapters[0]} adapts {list(specs[0].targets)}")
    causal_lm = load_causal_lm(preset, dtype=dtype_policies(settings.precision, training=False)[0])
    if specs:
        enable_lora(causal_lm.backbone, LoraSpec(max(spec.rank for spec in specs), specs[0].targets), quantize=quantize)
    else:
        quantize_base(causal_lm.backbone, quantize)
    causal_lm.compile(sampler=make_sampler(settings))
    return causal_lm


def use_adapter(backbone, adapter: str | os.PathLike | None) -> float:
    """Load `adapter` into the LoRA variables (None: zeros, the base model); returns its scale."""
    if adapter is not None:
        return load_padded_adapter(backbone, adapter).scale
    layers = lora_layers(backbone)
    zeros = [(np.zeros(layer.lora_kernel_a.shape, "float32"), np.zeros(layer.lora_kernel_b.shape, "float32")) for layer in layers]
    set_factors(layers, zeros)
    return 1.0


def answer_rows(records, prompts, prompt_ids, outputs, tokenizer) -> list[dict[str, Any]]:
    """One row per test record: its id and category, the prompt, the reference and the model's answer.

    `outputs` holds one list per generation seed; with several, the row also
    lists every seed's answer (`predictions`, the first being `prediction`),
    which the score stage averages.
    """
    rows = []
    for i, (record, text, ids) in enumerate(zip(records, prompts, prompt_ids)):
        answers = [seed_outputs[i] for seed_outputs in outputs]
        row = {
            "id": record["id"],
            "category": record["category"],
            "prompt": text,
            "reference": record["response"],
            "prediction": detokenize(tokenizer, answers[0]["new_ids"]),
            "prompt_tokens": len(ids),
            "new_tokens": len(answers[0]["new_ids"]),
            "stopped_at_eos": answers[0]["stopped"],
        }
        if len(answers) > 1:
            row["predictions"] = [detokenize(tokenizer, a["new_ids"]) for a in answers]
            row["new_tokens_per_seed"] = [len(a["new_ids"]) for a in answers]
        rows.append(row)
    return rows


def timing(new_tokens: int, seconds: float, compiled: Spent) -> dict[str, Any]:
    """Generation time with and without compilation, and new tokens per second both ways."""
    steady = seconds - compiled.seconds
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "compile_seconds": compiled.seconds,
        "compiled_programs": compiled.programs,
        "cache_hits": compiled.cache_hits,
        "steady_seconds": steady,
        "new_tokens_per_second": new_tokens / seconds if seconds else None,
        "steady_new_tokens_per_second": new_tokens / steady if steady > 0 else None,
    }

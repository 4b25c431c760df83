"""Generation on the test split, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorastudy.cli import main
from lorastudy.generate import generate
from lorastudy.io import read_jsonl
from lorastudy.prompts import DEFAULT_TEMPLATE, PromptTemplate

SETTINGS = {"batch_size": 3, "max_new_tokens": 12, "pad_multiple": 16}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_preset, tiny_data):
    out = tmp_path_factory.mktemp("gen")
    (stats,) = generate(tiny_preset, tiny_data["test"], [out / "g.jsonl"], [out / "g.json"], DEFAULT_TEMPLATE, settings=SETTINGS)
    return out, stats


def test_one_line_per_test_record_in_order(base_run, tiny_data):
    out, stats = base_run
    rows, test = read_jsonl(out / "g.jsonl"), read_jsonl(tiny_data["test"])
    assert [r["id"] for r in rows] == [r["id"] for r in test]
    for row, record in zip(rows, test):
        assert row["category"] == record["category"] and row["reference"] == record["response"]
        assert row["prompt"] == PromptTemplate().prompt(record["instruction"])
        assert 0 < row["new_tokens"] <= 12 and isinstance(row["prediction"], str)
        assert not row["prediction"].startswith("Instruction:")
    assert stats["prompts"] == len(test) == 8
    assert json.loads((out / "g.json").read_text()) == stats


def test_greedy_generation_is_deterministic(base_run, tiny_preset, tiny_data, tmp_path):
    out, _ = base_run
    generate(tiny_preset, tiny_data["test"], [tmp_path / "again.jsonl"], [tmp_path / "a.json"], DEFAULT_TEMPLATE, settings=SETTINGS)
    assert (tmp_path / "again.jsonl").read_bytes() == (out / "g.jsonl").read_bytes()


@pytest.mark.parametrize("change", [{"batch_size": 1}, {"pad_multiple": 1}, {"pad_multiple": 64}], ids=str)
def test_batching_does_not_change_greedy_answers(base_run, tiny_preset, tiny_data, tmp_path, change):
    """Neither the batch nor its width (generate.pad_multiple: decode steps past a row's own budget) changes an answer."""
    out, _ = base_run
    generate(tiny_preset, tiny_data["test"], [tmp_path / "b.jsonl"], [tmp_path / "b.json"], DEFAULT_TEMPLATE, settings={**SETTINGS, **change})
    answers = [r["prediction"] for r in read_jsonl(tmp_path / "b.jsonl")]
    assert answers == [r["prediction"] for r in read_jsonl(out / "g.jsonl")]


def whole_pass_answers(monkeypatch, *args, **kwargs) -> list[str]:
    """`generate`'s answers with KerasHub's own cache-seeding pass, over the whole width."""
    from contextlib import nullcontext

    from lorastudy import generate as generate_module

    with monkeypatch.context() as m:
        m.setattr(generate_module, "prefill_prompts_only", lambda causal_lm, new_tokens: nullcontext())
        generate(*args, **kwargs)
    return [r["prediction"] for r in read_jsonl(args[2][0])]


def test_the_first_pass_covers_the_prompts_only_and_answers_as_the_whole_one(base_run, tiny_preset, tiny_data, tmp_path, monkeypatch):
    from lorastudy import prefill

    widths, widen = [], prefill._widen
    monkeypatch.setattr(prefill, "_widen", lambda x, width: widths.append((x.shape[1], width)) or widen(x, width))
    answers = whole_pass_answers(monkeypatch, tiny_preset, tiny_data["test"], [tmp_path / "w.jsonl"], [tmp_path / "w.json"],
                                 DEFAULT_TEMPLATE, settings=SETTINGS)
    assert widths == []
    assert answers == [r["prediction"] for r in read_jsonl(base_run[0] / "g.jsonl")]
    generate(tiny_preset, tiny_data["test"], [tmp_path / "p.jsonl"], [tmp_path / "p.json"], DEFAULT_TEMPLATE, settings=SETTINGS)
    # Every traced width (a multiple of 16) seeds its first 12 fewer positions; the logits' and the hidden states' pads.
    assert widths and all(width % 16 == 0 and region == width - 12 for region, width in widths)


def test_top_k_is_seeded(tiny_preset, tiny_data, tmp_path):
    def top_k(seed, name):
        generate(tiny_preset, tiny_data["test"], [tmp_path / f"{name}.jsonl"], [tmp_path / f"{name}.json"], DEFAULT_TEMPLATE,
                 settings={**SETTINGS, "sampler": "top_k", "top_k": 50, "seed": seed})

    top_k(1, "a")
    top_k(1, "b")
    top_k(2, "c")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_ask_prints_an_answer(tiny_preset, base_run, tiny_data, capsys):
    out, _ = base_run
    first = read_jsonl(tiny_data["test"])[0]
    assert main(["ask", "--model", str(tiny_preset), "--max-new-tokens", "12", first["instruction"]]) == 0
    # The same answer as the batched generation of the same prompt.
    assert capsys.readouterr().out == read_jsonl(out / "g.jsonl")[0]["prediction"] + "\n"


@pytest.mark.parametrize("sampler", ["greedy", "top_k"])
def test_one_job_over_every_epoch_answers_as_separate_jobs_would(tiny_preset, tiny_data, tiny_adapters, tmp_path, sampler):
    """The model loads and compiles once; each adapter is swapped into the same variables."""
    settings = {**SETTINGS, "sampler": sampler, "top_k": 50, "seed": 3}
    outs = [tmp_path / f"job_epoch{e}.jsonl" for e in (1, 2)]
    stats = generate(tiny_preset, tiny_data["test"], outs, [tmp_path / f"job_epoch{e}.json" for e in (1, 2)],
                     DEFAULT_TEMPLATE, adapters=tiny_adapters, rank=4, settings=settings)
    for adapter, out in zip(tiny_adapters, outs):
        alone = tmp_path / f"alone_{adapter.stem}.jsonl"
        generate(tiny_preset, tiny_data["test"], [alone], [tmp_path / "alone.json"], DEFAULT_TEMPLATE,
                 adapters=[adapter], rank=4, settings=settings)
        assert out.read_bytes() == alone.read_bytes()
    assert outs[0].read_bytes() != outs[1].read_bytes()
    assert [s["runs_in_job"] for s in stats] == [2, 2] and stats[0]["load_seconds"] == stats[1]["load_seconds"]
    # The second run reuses the first one's compiled program.
    assert stats[0]["compiled_programs"] >= 1 and stats[1]["compiled_programs"] == 0
    for s in stats:
        assert s["steady_seconds"] == pytest.approx(s["seconds"] - s["compile_seconds"])
        assert s["steady_new_tokens_per_second"] >= s["new_tokens_per_second"] > 0


def test_batching_does_not_change_greedy_answers_with_an_adapter_either(tiny_preset, tiny_data, tiny_adapters, tmp_path, monkeypatch):
    """All 8 prompts in one batch (what "auto" gives on a GPU), 16 (auto on a CPU), and 3; nor does the first pass's width."""
    answers = {}
    for batch in (8, 16, 3, "auto"):
        out = tmp_path / f"b{batch}.jsonl"
        (stats,) = generate(tiny_preset, tiny_data["test"], [out], [tmp_path / "s.json"], DEFAULT_TEMPLATE,
                            adapters=tiny_adapters[-1:], settings={**SETTINGS, "batch_size": batch})
        answers[batch] = [r["prediction"] for r in read_jsonl(out)]
        assert stats["batch_size"] == (8 if batch == "auto" else batch)
    assert answers[8] == answers[16] == answers[3] == answers["auto"]
    whole = whole_pass_answers(monkeypatch, tiny_preset, tiny_data["test"], [tmp_path / "w.jsonl"], [tmp_path / "s.json"],
                               DEFAULT_TEMPLATE, adapters=tiny_adapters[-1:], settings=SETTINGS)
    assert whole == answers[3]


def test_auto_batch_takes_every_prompt_when_it_fits_else_equal_batches():
    from lorastudy.answer_batch import auto_batch_size

    assert auto_batch_size(500, per_row=10, free=20_000) == 500
    assert auto_batch_size(500, per_row=10, free=6_000) == 250  # 300 fit: two batches of 250
    assert auto_batch_size(500, per_row=10, free=2_000) == 100
    assert auto_batch_size(500, per_row=10, free=6_000, multiple=8) == 256
    assert auto_batch_size(500, per_row=10**9, free=100) == 1


def test_mixed_ranks_and_the_base_in_one_job_answer_as_separate_jobs(tiny_preset, tiny_data, tiny_adapters, tmp_path):
    """LoRA enabled once at the largest rank; each adapter loaded zero-padded; the base is the variables at zero."""
    from lorastudy.lora import LoraSpec, enable_lora, save_adapter
    from lorastudy.presets import load_causal_lm

    other = load_causal_lm(tiny_preset)
    layers = enable_lora(other.backbone, LoraSpec(2))
    for layer in layers:
        layer.lora_kernel_b.assign(0.5 * np.ones(layer.lora_kernel_b.shape))
    save_adapter(other.backbone, LoraSpec(2), tmp_path / "rank2.lora.h5")
    adapters = [tmp_path / "rank2.lora.h5", *tiny_adapters]
    names = ["base", "rank2", "rank4_epoch1", "rank4_epoch2"]
    outs = [tmp_path / f"job_{n}.jsonl" for n in names]
    stats = generate(tiny_preset, tiny_data["test"], outs, [tmp_path / f"job_{n}.json" for n in names], DEFAULT_TEMPLATE,
                     adapters=adapters, settings=SETTINGS, include_base=True)
    for adapter, out in zip([None, *adapters], outs):
        alone = tmp_path / "alone.jsonl"
        generate(tiny_preset, tiny_data["test"], [alone], [tmp_path / "alone.json"], DEFAULT_TEMPLATE,
                 adapters=[adapter] if adapter else [], settings=SETTINGS)
        assert out.read_bytes() == alone.read_bytes(), out
    assert len({out.read_bytes() for out in outs}) == len(outs), "two runs gave the same answers"
    # One program for every run: the first compiles it, the rest reuse it.
    assert stats[0]["compiled_programs"] >= 1 and all(s["compiled_programs"] == 0 for s in stats[1:])


def test_adapters_of_other_layers_in_one_job_fail_clearly(tiny_preset, tiny_data, tiny_adapters, tmp_path):
    from lorastudy.lora import AdapterError, LoraSpec, enable_lora, save_adapter
    from lorastudy.presets import load_causal_lm

    other = load_causal_lm(tiny_preset)
    enable_lora(other.backbone, LoraSpec(2, ("query", "key")))
    save_adapter(other.backbone, LoraSpec(2, ("query", "key")), tmp_path / "qk.lora.h5")
    with pytest.raises(AdapterError, match=r"qk.lora.h5 adapts \['query', 'key'\], but .*adapter_epoch1.lora.h5 adapts \['query', 'value'\]"):
        generate(tiny_preset, tiny_data["test"], [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], [tmp_path / "a.json", tmp_path / "b.json"],
                 DEFAULT_TEMPLATE, adapters=[tiny_adapters[0], tmp_path / "qk.lora.h5"], settings=SETTINGS)


def test_several_generation_seeds_answer_as_samplers_built_with_each_seed(tiny_preset, tiny_data, tmp_path):
    """dolly_eval's five seeds reuse one compiled program; each answers as its own seeded sampler would."""
    sampled = {**SETTINGS, "sampler": "random", "temperature": 1.0}
    (stats,) = generate(tiny_preset, tiny_data["test"], [tmp_path / "seeds.jsonl"], [tmp_path / "seeds.json"],
                        DEFAULT_TEMPLATE, settings={**sampled, "seeds": [10, 20, 30]})
    rows = read_jsonl(tmp_path / "seeds.jsonl")
    assert all(len(r["predictions"]) == 3 and r["prediction"] == r["predictions"][0] for r in rows)
    assert stats["answer_seeds"] == [10, 20, 30] and stats["compiled_programs"] >= 1
    for k, seed in enumerate((10, 20, 30)):
        generate(tiny_preset, tiny_data["test"], [tmp_path / f"s{seed}.jsonl"], [tmp_path / f"s{seed}.json"],
                 DEFAULT_TEMPLATE, settings={**sampled, "seed": seed})
        assert [r["prediction"] for r in read_jsonl(tmp_path / f"s{seed}.jsonl")] == [r["predictions"][k] for r in rows]
    assert any(len(set(r["predictions"])) > 1 for r in rows), "three seeds gave the same answers everywhere"
    assert stats["new_tokens"] == sum(sum(r["new_tokens_per_seed"]) for r in rows)


def test_long_prompts_keep_bos_and_their_last_tokens(tiny_preset):
    from lorastudy.generate import prompt_token_ids
    from lorastudy.presets import load_causal_lm

    tokenizer = load_causal_lm(tiny_preset).preprocessor.tokenizer
    prompts = ["short", "a much longer prompt " * 20]
    full, cut = prompt_token_ids(tokenizer, prompts), prompt_token_ids(tokenizer, prompts, max_tokens=10)
    assert cut[0] == full[0] and len(full[1]) > 10
    assert cut[1] == [tokenizer.start_token_id, *full[1][-9:]]

"""ROUGE scores, bootstrap intervals and paired differences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rouge_score import rouge_scorer

from lorastudy.io import write_jsonl
from lorastudy.scoring import ROUGE_TYPES, bootstrap_counts, bootstrap_indices, mean_interval, paired_difference, rouge_per_example, score_generations

PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on the mat."),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("Running runners ran quickly", "the runner runs quick"),
    ("Line one.\nLine two is longer.", "Line two is longer.\nLine one."),
    ("", "Nothing was predicted."),
    ("Completely unrelated words here", "Nothing in common at all"),
]


def test_rouge_equals_rouge_scores_own_on_hand_made_pairs():
    references, predictions = zip(*PAIRS)
    ours = rouge_per_example(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for i, (reference, prediction) in enumerate(PAIRS):
        expected = scorer.score(reference, prediction)
        for key in ROUGE_TYPES:
            assert ours.loc[i, key] == pytest.approx(expected[key].fmeasure, abs=1e-12), (i, key)


def test_stemming_each_word_once_gives_the_default_tokenizers_scores():
    """The score job's tokenizer caches each word's stem; the scores are the default tokenizer's, to the bit."""
    from dolly_like import SMOKE_DATA

    from lorastudy.io import read_jsonl

    rows = read_jsonl(SMOKE_DATA)
    references = [r["response"] for r in rows]
    predictions = [f"{r['instruction']} {other['response']}" for r, other in zip(rows, rows[1:] + rows[:1])]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    expected = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    ours = rouge_per_example(predictions, references)
    for key in ROUGE_TYPES:
        assert ours[key].tolist() == [e[key].fmeasure for e in expected], key


def test_rouge_equals_evaluates_rouge_module():
    """The study's scores are those of `evaluate`'s ROUGE (the module shipped in lorastudy/metrics)."""
    from pathlib import Path

    import evaluate

    import lorastudy

    module = evaluate.load(str(Path(lorastudy.__file__).parent / "metrics" / "rouge"))
    references, predictions = zip(*PAIRS)
    expected = module.compute(predictions=list(predictions), references=list(references), use_aggregator=False, use_stemmer=True)
    ours = rouge_per_example(predictions, references)
    for key in ROUGE_TYPES:
        assert ours[key].tolist() == pytest.approx(expected[key], abs=1e-12), key


def test_a_score_job_imports_no_machine_learning_framework(tmp_path):
    """Scoring needs rouge-score, NumPy and pandas: no JAX, Keras, TensorFlow, torch or datasets to start."""
    write_jsonl(tmp_path / "g.jsonl", [{"id": 1, "category": "open_qa", "prediction": "a cat", "reference": "the cat"}])
    code = (
        "import sys\n"
        "from lorastudy.logs import logging_to\n"
        "from lorastudy.scoring import score_generations\n"
        f"score_generations({str(tmp_path / 'g.jsonl')!r}, {str(tmp_path / 'p.csv')!r}, {str(tmp_path / 's.json')!r}, {str(tmp_path / 'c.csv')!r})\n"
        "print(sorted(m for m in ('jax', 'keras', 'tensorflow', 'torch', 'datasets', 'evaluate') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert json.loads((tmp_path / "s.json").read_text())["examples"] == 1


def test_hand_checked_values():
    # "the cats sat" against "the cat sat on the mat": with stemming 3 of 3 words
    # match, 3 of 6 reference words: F1 = 2 * 1 * 0.5 / 1.5.
    scores = rouge_per_example(["the cats sat"], ["the cat sat on the mat"])
    assert scores.loc[0, "rouge1"] == pytest.approx(2 / 3)
    assert rouge_per_example(["same words"], ["same words"]).loc[0].tolist() == [1.0] * 4


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 500, 5000):
        values = rng.uniform(size=n)
        ci = mean_interval(values, bootstrap_counts(n, 1000, seed=1)[0])
        assert ci["low"] < ci["mean"] < ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert widths[0] > widths[1] > widths[2]
    # About 1 / sqrt(10) narrower for each tenfold n.
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.25)


def test_bootstrap_is_seeded():
    values = np.arange(100.0)
    assert mean_interval(values, bootstrap_counts(100, 500, 3)[0]) == mean_interval(values, bootstrap_counts(100, 500, 3)[0])
    assert mean_interval(values, bootstrap_counts(100, 500, 3)[0]) != mean_interval(values, bootstrap_counts(100, 500, 4)[0])


def test_bootstrap_counts_are_the_indices_and_the_generator_goes_on_after_them():
    values = np.random.default_rng(2).random(60)
    indices = bootstrap_indices(60, 300, 5)
    counts, rng = bootstrap_counts(60, 300, 5)
    assert counts.sum(axis=1).tolist() == [60] * 300
    assert counts @ values / 60 == pytest.approx(values[indices].mean(axis=1), rel=1e-12)
    after = np.random.default_rng(5)
    after.integers(0, 60, size=(300, 60))
    expected = after.integers(0, 3, size=50).tolist()
    assert rng.integers(0, 3, size=50).tolist() == expected
    # Cached, so read-only; a second call's generator starts where the first one's did.
    assert not counts.flags.writeable
    assert bootstrap_counts(60, 300, 5)[1].integers(0, 3, size=50).tolist() == expected


def test_paired_difference():
    rng = np.random.default_rng(0)
    base = pd.DataFrame({"id": np.arange(300), "rougeL": rng.uniform(size=300)})
    same = paired_difference(base, base, "rougeL", 500, 0)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    better = base.assign(rougeL=base["rougeL"] + 0.05 + rng.normal(0, 0.01, size=300))
    diff = paired_difference(better.sample(frac=1, random_state=1), base, "rougeL", 500, 0)
    assert diff["low"] > 0.04 and diff["high"] < 0.06
    # Paired: far narrower than the spread of either run's own mean.
    own = mean_interval(base["rougeL"].to_numpy(), bootstrap_counts(300, 500, 0)[0])
    assert diff["high"] - diff["low"] < (own["high"] - own["low"]) / 5
    with pytest.raises(ValueError, match="different test examples"):
        paired_difference(better.iloc[:-1], base, "rougeL", 100, 0)


def test_score_generations_writes_all_three_files(tmp_path):
    rows = [
        {"id": i, "category": c, "prediction": p, "reference": r}
        for i, ((r, p), c) in enumerate(zip(PAIRS, ["open_qa", "open_qa", "brainstorming"] * 2))
    ]
    write_jsonl(tmp_path / "g.jsonl", rows)
    summary = score_generations(tmp_path / "g.jsonl", tmp_path / "e.csv", tmp_path / "s.json", tmp_path / "c.csv", bootstrap_samples=200)
    per_example = pd.read_csv(tmp_path / "e.csv")
    assert per_example["id"].tolist() == list(range(6))
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert summary["rougeL"]["mean"] == pytest.approx(per_example["rougeL"].mean(), abs=1e-6)
    by_category = pd.read_csv(tmp_path / "c.csv").set_index("category")
    assert by_category.loc["open_qa", "examples"] == 4
    assert by_category.loc["open_qa", "rougeL"] == pytest.approx(per_example.loc[[0, 1, 3, 4], "rougeL"].mean(), abs=1e-6)


def test_scoring_runs_side_by_side_writes_what_one_at_a_time_writes_and_names_a_bad_file(tmp_path):
    from lorastudy.scoring import score_all

    runs = ["base", "r4", "r16"]
    for k, run in enumerate(runs):
        write_jsonl(tmp_path / f"{run}.jsonl", [{"id": i, "category": "open_qa", "prediction": p if (i + k) % 2 else r, "reference": r}
                                                for i, (r, p) in enumerate(PAIRS)])
    files = {way: [[str(tmp_path / way / f"{run}_{kind}") for run in runs] for kind in ("e.csv", "s.json", "c.csv")] for way in ("one", "pool")}
    inputs = [str(tmp_path / f"{run}.jsonl") for run in runs]
    (tmp_path / "one").mkdir()
    summaries = score_all(inputs, *files["one"], bootstrap_samples=200)
    assert [s["rougeL"]["mean"] for s in summaries] == [json.loads(Path(p).read_text())["rougeL"]["mean"] for p in files["one"][1]]
    # Side by side in a fresh interpreter, as the score job runs (this test process has JAX's threads, which forking warns of).
    (tmp_path / "pool").mkdir()
    call = f"score_all({inputs!r}, *{files['pool']!r}, processes=3, bootstrap_samples=200)"
    subprocess.run([sys.executable, "-c", f"from lorastudy.scoring import score_all\n{call}"], check=True)
    for one, pool in zip(sum(files["one"], []), sum(files["pool"], [])):
        assert Path(one).read_bytes() == Path(pool).read_bytes(), one
    write_jsonl(tmp_path / "empty.jsonl", [])
    bad = [str(tmp_path / "base.jsonl"), str(tmp_path / "empty.jsonl")]
    call = f"score_all({bad!r}, *{[[str(tmp_path / f'x{i}_{k}') for i in range(2)] for k in 'esc']!r}, processes=2)"
    done = subprocess.run([sys.executable, "-c", f"from lorastudy.scoring import score_all\n{call}"], capture_output=True, text=True)
    assert done.returncode != 0 and "empty.jsonl: no generations to score" in done.stderr


def test_answers_of_several_generation_seeds_are_scored_as_their_mean():
    from lorastudy.scoring import answer_scores

    rows = [{"reference": "the cat sat on the mat", "prediction": "the cat sat", "predictions": ["the cat sat", "a dog ran", "the mat"]},
            {"reference": "blue sky", "prediction": "blue sky", "predictions": ["blue sky", "sky", "blue sky"]}]
    scores = answer_scores(rows)
    for i, row in enumerate(rows):
        each = rouge_per_example(row["predictions"], [row["reference"]] * 3)
        assert scores.loc[i].to_dict() == pytest.approx(each.mean().to_dict())
    with pytest.raises(ValueError, match="different numbers of generation seeds"):
        answer_scores([rows[0], {"reference": "x", "prediction": "x"}])

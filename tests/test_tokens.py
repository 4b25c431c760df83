"""Token-level examples, loss weights and length-bucketed batches."""

from __future__ import annotations

import numpy as np
import pytest

from lorastudy.prompts import PromptTemplate
from lorastudy.tokens import choose_widths, collate, encode_examples, pack_rows, plan_batches, plan_packed_batches, token_lists


class CharTokenizer:
    """A tokenizer with KerasHub's interface, one token per character, for exact expectations."""

    start_token_id, end_token_id, pad_token_id = 2, 1, 0

    def __call__(self, texts):
        return [[ord(c) for c in t] for t in texts]


RECORDS = [
    {"id": 5, "instruction": "ab", "response": "xyz"},
    {"id": 9, "instruction": "abcd", "response": "q"},
]
TEMPLATE = PromptTemplate("I{instruction}R{response}")


def test_sequence_is_bos_prompt_response_eos_and_weights_cover_the_response():
    examples, counts = encode_examples(CharTokenizer(), RECORDS, TEMPLATE, sequence_length=32)
    ex = examples[0]
    assert ex.id == 5 and counts == {"records": 2, "truncated": 0, "skipped": 0}
    assert ex.token_ids.tolist() == [2, *map(ord, "IabR"), *map(ord, "xyz"), 1]
    # Targets are token_ids[1:]: "abR" + "xyz" + eos; only "xyz" and eos are trained on.
    assert ex.loss_weights.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_the_text_closing_a_response_is_trained_on_before_eos():
    examples, _ = encode_examples(CharTokenizer(), RECORDS, PromptTemplate("I{instruction}R{response}E"), 32)
    assert examples[0].token_ids.tolist() == [2, *map(ord, "IabR"), *map(ord, "xyzE"), 1]
    assert examples[0].loss_weights.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_unmasked_training_weights_every_target():
    examples, _ = encode_examples(CharTokenizer(), RECORDS, TEMPLATE, 32, mask_prompt=False)
    assert examples[1].loss_weights.tolist() == [1.0] * (len(examples[1].token_ids) - 1)


def test_truncation_is_counted_and_records_without_response_are_skipped():
    long = {"id": 1, "instruction": "a" * 10, "response": "b" * 10}
    no_room = {"id": 2, "instruction": "a" * 20, "response": "b"}
    examples, counts = encode_examples(CharTokenizer(), [long, no_room], TEMPLATE, sequence_length=16)
    assert counts == {"records": 2, "truncated": 1, "skipped": 1}
    assert len(examples[0].token_ids) == 17 and examples[0].truncated


def test_collate_pads_with_zero_weight_and_masks_padding():
    examples, _ = encode_examples(CharTokenizer(), RECORDS, TEMPLATE, 32)
    x, row_weights = collate([[ex] for ex in examples], width=16, pad_id=0)
    y, w = x["targets"], x["loss_weights"]
    assert x["token_ids"].shape == y.shape == w.shape == (2, 16)
    for row, ex in enumerate(examples):
        n = ex.length
        assert x["padding_mask"][row].tolist() == [True] * n + [False] * (16 - n)
        assert w[row, n:].sum() == 0 and y[row, :n].tolist() == ex.token_ids[1:].tolist()
    # Loss weights are zero exactly on the prompt's targets and on padding.
    prompt_targets = len("IabR")
    assert (w[0] == 0).tolist() == [True] * prompt_targets + [False] * 4 + [True] * (16 - 8)
    assert row_weights.tolist() == w.sum(axis=1).tolist()


def test_filler_rows_keep_their_tokens_but_carry_no_loss():
    examples, _ = encode_examples(CharTokenizer(), RECORDS, TEMPLATE, 32)
    x, row_weights = collate([[examples[0]], [examples[0]]], width=16, pad_id=0, real=1)
    assert x["padding_mask"][1].sum() == examples[0].length
    assert row_weights.tolist() == [examples[0].loss_weights.sum(), 0.0]


def test_packed_rows_number_their_examples_and_keep_each_ones_tokens_and_weights():
    examples, _ = encode_examples(CharTokenizer(), RECORDS, TEMPLATE, 32)
    a, b = examples
    x, row_weights = collate([[a, b]], width=a.length + b.length + 3, pad_id=0)
    n = a.length
    assert x["padding_mask"][0].tolist() == [1] * n + [2] * b.length + [0] * 3
    assert x["token_ids"][0, n : n + b.length].tolist() == b.token_ids[:-1].tolist()
    assert x["targets"][0, :n].tolist() == a.token_ids[1:].tolist()
    assert x["loss_weights"][0, n : n + b.length].tolist() == b.loss_weights.tolist()
    assert row_weights.tolist() == [a.loss_weights.sum() + b.loss_weights.sum()]


LENGTHS = np.random.default_rng(0).integers(5, 250, size=203).tolist()


def test_packing_puts_every_example_in_one_row_that_holds_it_and_fills_rows_best_fit():
    rows = pack_rows(LENGTHS, 256)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in row) <= 256 for row in rows)
    # Best-fit decreasing's bound: at most 11/9 of the fewest rows possible, plus one.
    assert len(rows) <= 11 / 9 * -(-sum(LENGTHS) // 256) + 1
    assert pack_rows([3, 5, 4, 2], 8) == [(1, 0), (2, 3)]
    with pytest.raises(ValueError, match="300 tokens"):
        pack_rows([10, 300], 256)


def test_packed_batches_are_seeded_per_epoch_and_every_row_counts_once():
    rows = pack_rows(LENGTHS, 256)
    plan = lambda rng: [b.rows for b in plan_packed_batches(rows, 256, 4, rng)]  # noqa: E731
    assert plan(np.random.default_rng(3)) == plan(np.random.default_rng(3))
    assert plan(np.random.default_rng(3)) != plan(np.random.default_rng(4))
    batches = plan_packed_batches(rows, 256, 4, np.random.default_rng(3))
    assert sorted(i for b in batches for i in b.examples()) == list(range(len(LENGTHS)))
    assert all(len(b.rows) == 4 for b in batches) and sum(b.real < 4 for b in batches) == (len(rows) % 4 > 0)


@pytest.mark.parametrize("widths", [[256], [64, 128, 256], [32, 48, 96, 250]])
def test_every_example_is_in_exactly_one_batch_of_one_shape_per_width(widths):
    batches = plan_batches(LENGTHS, widths, 8, np.random.default_rng(1))
    real = [i for b in batches for i in b.examples()]
    assert sorted(real) == list(range(len(LENGTHS)))
    assert all(len(b.rows) == 8 and all(len(row) == 1 for row in b.rows) for b in batches)
    assert all(LENGTHS[i] <= b.width for b in batches for (i,) in b.rows)
    # Only the widest width may hold a batch that is not all real rows.
    assert all(b.real == 8 or b.width == widths[-1] for b in batches)
    assert sum(b.real < 8 for b in batches) <= 1


def test_batch_order_is_seeded_and_evaluation_keeps_input_order():
    plan = lambda rng: [[i for (i,) in b.rows] for b in plan_batches(LENGTHS, [64, 128, 256], 8, rng)]  # noqa: E731
    assert plan(np.random.default_rng(3)) == plan(np.random.default_rng(3))
    assert plan(np.random.default_rng(3)) != plan(np.random.default_rng(4))
    first_bucket = [i for i in range(len(LENGTHS)) if LENGTHS[i] <= 64]
    assert plan(None)[0] == first_bucket[:8]


def _padded(lengths, widths):
    return sum(min(w for w in widths if w >= n) for n in lengths)


@pytest.mark.parametrize("compile_seconds", [0.0, 0.5, 3.0, 20.0, 1e6])
def test_chosen_widths_minimise_the_modelled_time_over_every_choice(compile_seconds):
    """Brute force over every set of candidate widths (the widest is always needed)."""
    import itertools

    lengths = np.random.default_rng(2).integers(5, 120, size=300).tolist()
    candidates = list(range(16, 128, 16))
    time = lambda widths: 2 * _padded(lengths, widths) / 1000.0 + len(widths) * compile_seconds  # noqa: E731
    best = min(time((*c, 128)) for k in range(len(candidates) + 1) for c in itertools.combinations(candidates, k))
    chosen = choose_widths(lengths, 128, 16, epochs=2, compile_seconds=compile_seconds, tokens_per_second=1000.0)
    assert chosen == sorted(set(chosen)) and chosen[-1] == 128
    assert time(chosen) == pytest.approx(best)


def test_compile_time_is_weighed_against_padding_saved():
    lengths = np.random.default_rng(0).integers(5, 250, size=1000).tolist()
    many = choose_widths(lengths, 256, 16, epochs=3, compile_seconds=1.0, tokens_per_second=100.0)
    few = choose_widths(lengths, 256, 16, epochs=3, compile_seconds=15.0, tokens_per_second=40000.0)
    assert len(many) > len(few) >= 1 and few[-1] == many[-1] == 256
    assert _padded(lengths, many) < _padded(lengths, few)
    # The longest validation example sets the widest width.
    assert choose_widths([10, 20], 256, 16, longest=70)[-1] == 80


def test_token_lists_with_the_kerashub_tokenizer(tiny_preset):
    from lorastudy.presets import load_causal_lm

    tokenizer = load_causal_lm(tiny_preset).preprocessor.tokenizer
    ids = token_lists(tokenizer, ["river city", "ocean"])
    assert len(ids) == 2 and all(isinstance(t, int) for t in ids[0])
    assert tokenizer.detokenize([ids[0]])[0] == "river city"

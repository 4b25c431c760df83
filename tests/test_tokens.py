"""Token-level examples, loss weights and length-bucketed batches."""

from __future__ import annotations

import numpy as np
import pytest

from lorastudy.prompts import PromptTemplate
from lorastudy.tokens import collate, encode_examples, padded_width, plan_batches, token_lists


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
    x, y, w = collate(examples, width=16, pad_id=0)
    assert x["token_ids"].shape == y.shape == w.shape == (2, 16)
    for row, ex in enumerate(examples):
        n = ex.length
        assert x["padding_mask"][row].tolist() == [True] * n + [False] * (16 - n)
        assert w[row, n:].sum() == 0 and y[row, :n].tolist() == ex.token_ids[1:].tolist()
    # Loss weights are zero exactly on the prompt's targets and on padding.
    prompt_targets = len("IabR")
    assert (w[0] == 0).tolist() == [True] * prompt_targets + [False] * 4 + [True] * (16 - 8)


@pytest.mark.parametrize("bucketing", [True, False])
def test_every_example_is_in_exactly_one_batch(bucketing):
    lengths = np.random.default_rng(0).integers(5, 250, size=203).tolist()
    batches = plan_batches(lengths, 8, np.random.default_rng(1), bucketing)
    assert sorted(np.concatenate(batches).tolist()) == list(range(203))
    assert all(len(b) == 8 for b in batches[:-1]) or bucketing


def test_bucketing_is_seeded_and_cuts_padding():
    lengths = np.random.default_rng(0).integers(5, 250, size=512).tolist()
    plan = lambda seed, bucketing: plan_batches(lengths, 8, np.random.default_rng(seed), bucketing)
    assert [b.tolist() for b in plan(3, True)] == [b.tolist() for b in plan(3, True)]
    assert [b.tolist() for b in plan(3, True)] != [b.tolist() for b in plan(4, True)]
    padded = lambda batches: sum(len(b) * padded_width(max(lengths[i] for i in b), 256, 64) for b in batches)
    assert padded(plan(3, True)) < 0.8 * padded(plan(3, False))


def test_token_lists_with_the_kerashub_tokenizer(tiny_preset):
    from lorastudy.models import load_causal_lm

    tokenizer = load_causal_lm(tiny_preset).preprocessor.tokenizer
    ids = token_lists(tokenizer, ["river city", "ocean"])
    assert len(ids) == 2 and all(isinstance(t, int) for t in ids[0])
    assert tokenizer.detokenize([ids[0]])[0] == "river city"

"""Records to token arrays: training sequences with loss weights, and batches.

A training sequence is `<bos> prompt response <eos>`, the prompt and the
response tokenized separately so that the prompt's tokens are exactly those
that generation will see. The loss weight of a target token is 1 where it
belongs to the response (or is the closing `<eos>`), 0 on the prompt (unless
the whole sequence is trained on) and on padding.

Batches are drawn in length buckets: each batch holds records of similar
length and is padded only to the next multiple of `pad_multiple`, not to the
full sequence length. Dolly's records are mostly far shorter than 256 tokens,
so this skips most of the padding while keeping each example's attention to
itself; the few distinct widths keep XLA's compilations few.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorastudy.prompts import PromptTemplate


@dataclass(frozen=True)
class Example:
    """One tokenized training record."""

    id: int
    token_ids: np.ndarray  # int32 [n + 1]: inputs are [:-1], targets [1:]
    loss_weights: np.ndarray  # float32 [n], aligned with the targets
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.loss_weights)


def token_lists(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, with the KerasHub tokenizer (no special tokens)."""
    out = tokenizer(list(texts))
    if hasattr(out, "to_list"):  # a tf.RaggedTensor on TensorFlow's path
        out = out.to_list()
    return [[int(t) for t in ids] for ids in out]


def encode_examples(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    template: PromptTemplate,
    sequence_length: int,
    mask_prompt: bool = True,
) -> tuple[list[Example], dict[str, int]]:
    """Tokenize records into training examples of at most `sequence_length` targets.

    Returns the examples and counts: `truncated` (longer than the sequence
    length, cut at the end) and `skipped` (no response token left after the
    cut, so nothing to learn; left out).
    """
    bos, eos = tokenizer.start_token_id, tokenizer.end_token_id
    prompts = token_lists(tokenizer, [template.prompt(r["instruction"]) for r in records])
    responses = token_lists(tokenizer, [r["response"] for r in records])
    examples, counts = [], {"records": len(records), "truncated": 0, "skipped": 0}
    for record, p, r in zip(records, prompts, responses):
        ids = [bos, *p, *r, eos]
        # Target t predicts ids[t + 1]; the response starts at target len(p).
        weights = [0.0 if mask_prompt and t < len(p) else 1.0 for t in range(len(ids) - 1)]
        truncated = len(ids) > sequence_length + 1
        ids, weights = ids[: sequence_length + 1], weights[:sequence_length]
        if not any(weights):
            counts["skipped"] += 1
            continue
        counts["truncated"] += truncated
        examples.append(Example(record["id"], np.array(ids, "int32"), np.array(weights, "float32"), truncated))
    return examples, counts


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    rng: np.random.Generator | None,
    bucketing: bool = True,
    megabatch: int = 32,
) -> list[np.ndarray]:
    """Indices of each batch, in the order they are trained on.

    Without `rng` the order is the input's (evaluation). With bucketing, a
    shuffled order is cut into megabatches of `megabatch` batches, each is
    sorted by length and cut into batches, and the batches are shuffled:
    random like a plain shuffle, but with little padding in each batch.
    """
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if bucketing:
        size = batch_size * megabatch
        order = np.concatenate(
            [sorted(order[i : i + size], key=lambda j: -lengths[j]) for i in range(0, n, size)]
        ).astype(int)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if bucketing and rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_width(longest: int, sequence_length: int, pad_multiple: int) -> int:
    """The width a batch is padded to: the next multiple, at most the sequence length."""
    return min(sequence_length, round_up(longest, pad_multiple))


def collate(
    examples: Sequence[Example], width: int, pad_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Stack examples into (inputs, targets, loss weights) of shape [batch, width]."""
    token_ids = np.full((len(examples), width), pad_id, "int32")
    targets = np.full((len(examples), width), pad_id, "int32")
    weights = np.zeros((len(examples), width), "float32")
    padding_mask = np.zeros((len(examples), width), bool)
    for row, ex in enumerate(examples):
        n = ex.length
        token_ids[row, :n] = ex.token_ids[:-1]
        targets[row, :n] = ex.token_ids[1:]
        weights[row, :n] = ex.loss_weights
        padding_mask[row, :n] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}, targets, weights

"""Records to token arrays: training sequences with loss weights, and batches.

A training sequence is `<bos> prompt response end <eos>` (`end` being the
template's closing text, such as the chat format's `<end_of_turn>`, often
none), the prompt and the response tokenized separately so that the
prompt's tokens are exactly those that generation will see. The loss weight
of a target token is 1 where it belongs to the response (or is the closing
`end` or `<eos>`), 0 on the prompt (unless the whole sequence is trained on)
and on padding.

Batches are drawn in length buckets: each batch holds records of one
bucket and is padded only to that bucket's width, not to the full sequence
length. Dolly's records are mostly far shorter than 256 tokens, so this
skips most of the padding while keeping each example's attention to itself.
Every width is one more XLA compilation, so the widths are chosen for the
data's own lengths by what they save in padding against what they cost to
compile (`choose_widths`).
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
    end = token_lists(tokenizer, [template.end])[0] if template.end else []
    examples, counts = [], {"records": len(records), "truncated": 0, "skipped": 0}
    for record, p, r in zip(records, prompts, responses):
        ids = [bos, *p, *r, *end, eos]
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


@dataclass(frozen=True)
class Batch:
    """One batch: its width and `batch_size` example indices, of which the first `real` count.

    The rows past `real` repeat the first example with no loss weight, so
    that every batch of a width has one shape (one compiled program) and no
    row is all padding.
    """

    width: int
    indices: np.ndarray
    real: int


def choose_widths(
    lengths: Sequence[int],
    sequence_length: int,
    granularity: int,
    epochs: int = 1,
    compile_seconds: float = 0.0,
    tokens_per_second: float = float("inf"),
    longest: int | None = None,
) -> list[int]:
    """The bucket widths that minimise training time: padded tokens against compilations.

    Candidates are the multiples of `granularity` up to the sequence length.
    Each example is padded to the smallest chosen width that holds it; for
    each number of widths k, the widths that pad least come from a dynamic
    program over the candidates, and k is chosen to minimise
    epochs × padded tokens / tokens_per_second + k × compile_seconds.
    The largest width holds `longest` (default: the longest length).
    """
    top = padded_width(max(longest or 0, *lengths), sequence_length, granularity)
    candidates = sorted({min(w, top) for w in range(granularity, top + granularity, granularity)})
    # counts[i]: examples whose smallest candidate is candidates[i].
    counts = np.bincount(np.searchsorted(candidates, lengths), minlength=len(candidates)).astype(float)
    below = np.concatenate([[0.0], np.cumsum(counts)])
    m = len(candidates)
    # cost[k][i]: fewest padded tokens for examples up to candidate i with k widths, the last one candidate i.
    cost = np.full((m + 1, m), np.inf)
    back = np.zeros((m + 1, m), int)
    cost[1] = [candidates[i] * below[i + 1] for i in range(m)]
    for k in range(2, m + 1):
        for i in range(k - 1, m):
            # The previous width is candidate p, for p in k-2 .. i-1.
            options = cost[k - 1][k - 2 : i] + candidates[i] * (below[i + 1] - below[k - 1 : i + 1])
            back[k][i] = k - 2 + int(np.argmin(options))
            cost[k][i] = options.min()
    seconds = [epochs * cost[k][m - 1] / tokens_per_second + k * compile_seconds for k in range(1, m + 1)]
    k, i, widths = int(np.argmin(seconds)) + 1, m - 1, []
    while k >= 1:
        widths.append(candidates[i])
        i, k = back[k][i], k - 1
    return sorted(widths)


def plan_batches(
    lengths: Sequence[int], widths: Sequence[int], batch_size: int, rng: np.random.Generator | None
) -> list[Batch]:
    """The batches of one epoch, in the order they are trained on.

    Each example goes to the smallest width that holds it. Within a width,
    examples are in random order (input order without `rng`: evaluation);
    what does not fill a last batch moves up to the next width, and the
    widest width's remainder is filled up with repeated rows. The batches
    are then shuffled: random like a plain shuffle, with little padding.
    """
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    bucket = np.searchsorted(widths, np.asarray(lengths)[order])
    batches, carried = [], np.array([], int)
    for b, width in enumerate(widths):
        members = np.concatenate([carried, order[bucket == b]])
        full = len(members) // batch_size * batch_size
        batches += [Batch(width, members[i : i + batch_size], batch_size) for i in range(0, full, batch_size)]
        carried = members[full:]
    if len(carried):
        filler = np.full(batch_size - len(carried), carried[0])
        batches.append(Batch(widths[-1], np.concatenate([carried, filler]), len(carried)))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_width(longest: int, sequence_length: int, pad_multiple: int) -> int:
    """The next multiple of `pad_multiple`, at most the sequence length."""
    return min(sequence_length, round_up(longest, pad_multiple))


def collate(examples: Sequence[Example], width: int, pad_id: int, real: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stack examples into the training model's inputs, [batch, width] each, and each row's loss weight.

    Rows from `real` on keep their tokens but get no loss weight.
    """
    n = len(examples)
    token_ids = np.full((n, width), pad_id, "int32")
    targets = np.full((n, width), pad_id, "int32")
    weights = np.zeros((n, width), "float32")
    padding_mask = np.zeros((n, width), bool)
    for row, ex in enumerate(examples):
        k = ex.length
        token_ids[row, :k] = ex.token_ids[:-1]
        targets[row, :k] = ex.token_ids[1:]
        padding_mask[row, :k] = True
        if real is None or row < real:
            weights[row, :k] = ex.loss_weights
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask, "targets": targets, "loss_weights": weights}
    return inputs, weights.sum(axis=1)


def training_batches():
    """The Keras dataset class of training and validation batches (built on first use: it needs Keras)."""
    import keras

    class Batches(keras.utils.PyDataset):
        """Length-bucketed batches of fixed shapes; the order is a function of (seed, epoch).

        Making the order depend on the epoch number alone (not on how many
        epochs this process has run) is what lets a resumed run see the same
        batches as an uninterrupted one.
        """

        def __init__(self, examples, widths, batch_size, pad_id, seed=None):
            super().__init__()
            self.examples, self.widths, self.batch_size, self.pad_id, self.seed = examples, widths, batch_size, pad_id, seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            rng = None if self.seed is None else np.random.default_rng([self.seed, epoch])
            self.batches = plan_batches([ex.length for ex in self.examples], self.widths, self.batch_size, rng)

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, index: int):
            b = self.batches[index]
            return collate([self.examples[i] for i in b.indices], b.width, self.pad_id, b.real)

        def padded_tokens(self) -> int:
            return sum(len(b.indices) * b.width for b in self.batches)

        def loss_tokens(self, index: int) -> float:
            b = self.batches[index]
            return float(sum(self.examples[i].loss_weights.sum() for i in b.indices[: b.real]))

    return Batches

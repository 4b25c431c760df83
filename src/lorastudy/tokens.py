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

With packing, batches have one width, the sequence length, and each row
holds several whole records (`pack_rows`, best-fit decreasing): almost no
padding and one program shape. The padding mask then numbers each row's
records (1, 2, ...; 0 for padding), and the model lets a token attend only
within its own record (`lorastudy.models.attend_within_segments`). A row is
then a batch member, so `batch_size` counts rows and an epoch takes fewer
steps, as in TRL's packing.
"""

from __future__ import annotations

import bisect
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
    """One batch: its width and `batch_size` rows of example indices, of which the first `real` count.

    A row holds one example, or several when packed. The rows past `real`
    repeat the first row with no loss weight, so that every batch of a
    width has one shape (one compiled program) and no row is all padding.
    """

    width: int
    rows: tuple[tuple[int, ...], ...]
    real: int

    def examples(self) -> list[int]:
        """The indices of the examples that count (those of the first `real` rows)."""
        return [i for row in self.rows[: self.real] for i in row]


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
    batches, carried = [], []
    for b, width in enumerate(widths):
        members = carried + [(int(i),) for i in order[bucket == b]]
        full = len(members) // batch_size * batch_size
        batches += [_batch(width, members[i : i + batch_size], batch_size) for i in range(0, full, batch_size)]
        carried = members[full:]
    if carried:
        batches.append(_batch(widths[-1], carried, batch_size))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pack_rows(lengths: Sequence[int], width: int) -> list[tuple[int, ...]]:
    """Example indices packed into rows of `width` tokens, best-fit decreasing.

    Longest first, each example goes to the row with the least room that
    still holds it, or starts a new row. Deterministic: ties keep input
    order. Every length must be at most `width` (examples are cut to the
    sequence length).
    """
    if max(lengths, default=0) > width:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a packed row of {width}")
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(rooms, (lengths[i], -1))
        if k == len(rooms):
            rows.append([i])
            room, row = width - lengths[i], len(rows) - 1
        else:
            room, row = rooms.pop(k)
            rows[row].append(i)
            room -= lengths[i]
        if room:
            bisect.insort(rooms, (room, row))
    return [tuple(r) for r in rows]


def plan_packed_batches(rows: Sequence[tuple[int, ...]], width: int, batch_size: int, rng: np.random.Generator | None) -> list[Batch]:
    """The batches of one epoch over packed rows: the rows in random order (as given without `rng`), `batch_size` at a time."""
    order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
    rows = [rows[i] for i in order]
    return [_batch(width, rows[i : i + batch_size], batch_size) for i in range(0, len(rows), batch_size)]


def epoch_batches(
    lengths: Sequence[int], widths: Sequence[int], batch_size: int, seed: int | None, epoch: int,
    packed_rows: Sequence[tuple[int, ...]] | None = None,
) -> list[Batch]:
    """The batches of one epoch, in an order that is a function of (seed, epoch) alone (input order without a seed).

    That the order depends on the epoch's number, not on how many epochs a
    process has run, is what lets a resumed run see the batches of an
    uninterrupted one. With `packed_rows` (one width), the rows are batched.
    """
    rng = None if seed is None else np.random.default_rng([seed, epoch])
    if packed_rows is not None:
        return plan_packed_batches(packed_rows, widths[0], batch_size, rng)
    return plan_batches(lengths, widths, batch_size, rng)


def stack_batches(batches: Sequence[Batch], examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Several runs' batches of one step, each padded to the widest of them: [runs, batch, width] arrays."""
    width = max(b.width for b in batches)
    inputs = [collate([[examples[i] for i in row] for row in b.rows], width, pad_id, b.real)[0] for b in batches]
    return {key: np.stack([x[key] for x in inputs]) for key in inputs[0]}


def _batch(width: int, rows: Sequence[tuple[int, ...]], batch_size: int) -> Batch:
    """A batch of `rows`, filled up to `batch_size` with repeats of the first, which do not count."""
    return Batch(width, tuple(rows) + (rows[0],) * (batch_size - len(rows)), len(rows))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_width(longest: int, sequence_length: int, pad_multiple: int) -> int:
    """The next multiple of `pad_multiple`, at most the sequence length."""
    return min(sequence_length, round_up(longest, pad_multiple))


def collate(rows: Sequence[Sequence[Example]], width: int, pad_id: int, real: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Lay rows of examples into the training model's inputs, [batch, width] each, and each row's loss weight.

    The examples of a row follow one another; the padding mask numbers them
    from 1 (0 is padding), so a row of one example has the usual 1/0 mask.
    Rows from `real` on keep their tokens but get no loss weight.
    """
    n = len(rows)
    token_ids = np.full((n, width), pad_id, "int32")
    targets = np.full((n, width), pad_id, "int32")
    weights = np.zeros((n, width), "float32")
    padding_mask = np.zeros((n, width), "int32")
    for r, examples in enumerate(rows):
        start = 0
        for segment, ex in enumerate(examples, start=1):
            span = slice(start, start + ex.length)
            token_ids[r, span] = ex.token_ids[:-1]
            targets[r, span] = ex.token_ids[1:]
            padding_mask[r, span] = segment
            if real is None or r < real:
                weights[r, span] = ex.loss_weights
            start += ex.length
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask, "targets": targets, "loss_weights": weights}
    return inputs, weights.sum(axis=1)

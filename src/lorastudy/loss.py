"""The training loss: cross-entropy over the response tokens, with logits only where it counts.

A Gemma's output projection is its (tied) token embedding: one matrix product
of the hidden states with a [vocabulary, hidden] matrix, 256k rows wide.
Computed for every position of a batch, as `CausalLM`'s logits are, it is
the largest single term of the step for small Gemmas (the embedding is 168M
of Gemma 3 270M's 268M parameters) and a [batch, width, 256k] float32 tensor
in memory. The loss needs it only at the response tokens: the prompt is
masked, and padding never counts.

`token_cross_entropy` gathers the positions whose loss weight is non-zero
to the front, then computes logits, log-sum-exp and the gradient with
respect to the hidden states for them alone, a chunk of rows at a time in a
loop whose trip count is the number of such chunks. The embedding is frozen
under LoRA, so the hidden states' gradient is all the backward pass needs;
it is computed in the forward pass (as fused linear cross-entropy kernels
do) and returned by a custom VJP. Outside differentiation (validation) the
gradient is skipped.

`response_loss_model` wraps a KerasHub CausalLM into the Keras model that
`fit` trains: inputs are the batch's tokens, targets and loss weights, the
output per row is [loss sum, correct predictions], and `batch_mean_loss` /
`TokenAccuracy` turn those into the mean loss over the batch's weighted
tokens and the token accuracy, exactly as a full-logits cross-entropy with
`mean_with_sample_weight` would. With packed rows (`segments=True`) each
token attends only within its own record (`attend_within_segments`).
(Imported by the finetune stage only when it trains: it imports Keras and
JAX.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import keras
from lorastudy.backbones import decoder_blocks, hidden_states, output_embedding, output_matrix
from lorastudy.internals import wrap_attention_mask

# Logit values (rows x vocabulary) computed at once, per backend. GPU: about
# 128M float32 values (512 rows of a 256k vocabulary); measured on an H100
# with Gemma 2B at 256 x 4 and 256 x 8: 36 and 58 ms a step, against 46 and
# 58 with half as many and 41 and 58 with twice as many
# (benchmarks/results/job_overhead.json). CPU: 16M (64 rows); the main
# job's grouped finetune on 2 cores peaked at 6.3 GB against 8.2 with the
# GPU's chunk, in 0.89-0.98x the time; 4M cut the page faults by two thirds
# but took as long, 1M was slower (benchmarks/results/cpu_malloc.csv).
LOGIT_VALUES_PER_CHUNK = {"gpu": 2**27, "cpu": 2**24}


def logit_values_per_chunk(backend: str | None = None) -> int:
    """The backend's logit values per chunk (JAX's default backend unless named; a GPU's for one not listed)."""
    return LOGIT_VALUES_PER_CHUNK.get(backend or jax.default_backend(), LOGIT_VALUES_PER_CHUNK["gpu"])


def chunk_rows(vocabulary_size: int, positions: int, backend: str | None = None) -> int:
    """Rows of logits per chunk: the backend's values' worth, at most the positions rounded up to 8."""
    rows = max(8, logit_values_per_chunk(backend) // vocabulary_size)
    return min(rows, max(8, -(-positions // 8) * 8))


def token_cross_entropy(hidden, embeddings, targets, weights, soft_cap: float | None = None, groups: int = 1):
    """Weighted cross-entropy and correctness at each position, from hidden states.

    Args:
        hidden: [batch, width, hidden_dim], the backbone's final hidden states.
        embeddings: [vocabulary, hidden_dim], the (tied) output projection.
        targets: [batch, width] int, the next token at each position.
        weights: [batch, width] float, the loss weight of each position (0: no loss).
        soft_cap: the model's final-logit soft cap (Gemma 2), or None.
        groups: how many equal slices of the batch to compute separately
            (the data-parallel devices).
    Returns:
        (loss, correct), each [batch, width] float32: weight × cross-entropy,
        and weight × (argmax of the logits == target).
    """
    batch, width, dim = hidden.shape
    if groups > 1:
        # Each slice of the batch on its own: under data parallelism, a device's
        # rows are sorted and chunked where they are, with no gather across devices.
        split = lambda x: x.reshape(groups, batch // groups, *x.shape[1:])  # noqa: E731
        per_group = jax.vmap(functools.partial(token_cross_entropy, soft_cap=soft_cap), in_axes=(0, None, 0, 0))
        loss, correct = per_group(split(hidden), embeddings, split(targets), split(weights))
        return loss.reshape(batch, width), correct.reshape(batch, width)
    rows = chunk_rows(embeddings.shape[0], batch * width)
    loss, correct = _cross_entropy(
        hidden.reshape(-1, dim), embeddings, targets.reshape(-1), weights.reshape(-1).astype("float32"), soft_cap, rows
    )
    return loss.reshape(batch, width), correct.reshape(batch, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _cross_entropy(hidden, embeddings, targets, weights, soft_cap, rows):
    loss, correct, _ = _chunked(hidden, embeddings, targets, weights, soft_cap, rows, with_grad=False)
    return loss, correct


def _forward(hidden, embeddings, targets, weights, soft_cap, rows):
    loss, correct, grad = _chunked(hidden, embeddings, targets, weights, soft_cap, rows, with_grad=True)
    return (loss, correct), (grad.astype(hidden.dtype), weights)


def _backward(soft_cap, rows, residuals, cotangents):
    grad, weights = residuals
    loss_cotangent, _ = cotangents
    # The embedding is frozen under LoRA, targets and weights are data: no gradients for them.
    return (grad * loss_cotangent[:, None].astype(grad.dtype), None, None, None)


_cross_entropy.defvjp(_forward, _backward)


def _chunked(hidden, embeddings, targets, weights, soft_cap, rows, with_grad):
    n, dim = hidden.shape
    # Positions with a loss first (a stable sort keeps their order), then the rest.
    order = jnp.argsort(weights == 0, stable=True)
    padded = -(-n // rows) * rows
    pad = lambda x: jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
    h, t, w = pad(hidden[order]), pad(targets[order]), pad(weights[order])
    chunks = (jnp.sum(weights != 0) + rows - 1) // rows

    def body(i, carry):
        loss, correct, grad = carry
        start = i * rows
        hc = jax.lax.dynamic_slice_in_dim(h, start, rows)
        tc = jax.lax.dynamic_slice_in_dim(t, start, rows)
        wc = jax.lax.dynamic_slice_in_dim(w, start, rows)
        logits = jnp.dot(hc, embeddings.T, preferred_element_type=jnp.float32)
        if soft_cap is not None:
            logits = jnp.tanh(logits / soft_cap) * soft_cap
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        # `where`, not a product: a position without loss contributes 0 even if its row is not finite.
        counts = wc != 0
        loss = jax.lax.dynamic_update_slice_in_dim(loss, jnp.where(counts, (lse - target_logit) * wc, 0.0), start, 0)
        hit = jnp.where(counts & (jnp.argmax(logits, axis=-1) == tc), wc, 0.0)
        correct = jax.lax.dynamic_update_slice_in_dim(correct, hit, start, 0)
        if with_grad:
            # d(weight × CE)/d logits = weight × (softmax − one-hot of the target).
            d_logits = jnp.where(counts[:, None], jnp.exp(logits - lse[:, None]) * wc[:, None], 0.0)
            d_logits = d_logits.at[jnp.arange(rows), tc].add(-wc)
            if soft_cap is not None:
                d_logits = d_logits * (1.0 - jnp.square(logits / soft_cap))
            d_hidden = jnp.dot(d_logits.astype(embeddings.dtype), embeddings, preferred_element_type=jnp.float32)
            grad = jax.lax.dynamic_update_slice_in_dim(grad, d_hidden, start, 0)
        return loss, correct, grad

    zeros = jnp.zeros((padded,), jnp.float32)
    grad = jnp.zeros((padded, dim) if with_grad else (0, dim), jnp.float32)
    loss, correct, grad = jax.lax.fori_loop(0, chunks, body, (zeros, zeros, grad))
    # Back to the positions' own order.
    unsort = lambda x: jnp.zeros((n, *x.shape[1:]), x.dtype).at[order].set(x[:n])  # noqa: E731
    return unsort(loss), unsort(correct), (unsort(grad) if with_grad else None)


# --------------------------------------------------------------------------
# the Keras side
# --------------------------------------------------------------------------


def response_loss_model(causal_lm, groups: int = 1, segments: bool = False) -> keras.Model:
    """A Keras model over `causal_lm`'s backbone (same variables) whose output is the loss statistics per row.

    Inputs: `token_ids`, `padding_mask`, `targets`, `loss_weights`, each
    [batch, width]. Output: [batch, 2], each row's weighted loss sum and
    weighted correct predictions. Compile it with `batch_mean_loss` and
    `TokenAccuracy`, and give `fit` the rows' loss weights as `y`. `groups`:
    the data-parallel devices, each of which computes its rows' loss alone.
    `segments`: the padding mask numbers the records packed into each row
    (`lorastudy.tokens.collate`), and attention stays within each.
    """
    backbone = causal_lm.backbone
    if segments:
        attend_within_segments(backbone)
    inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input(shape=(None,), dtype="int32", name="padding_mask"),
        "targets": keras.Input(shape=(None,), dtype="int32", name="targets"),
        "loss_weights": keras.Input(shape=(None,), dtype="float32", name="loss_weights"),
    }
    features = {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}
    if "position_ids" in backbone.input:
        features["position_ids"] = SegmentPositions()(inputs["padding_mask"])
    hidden = hidden_states(backbone, features)
    embedding, soft_cap = output_embedding(backbone)
    stats = ResponseLoss(embedding, soft_cap, groups)(hidden, inputs["targets"], inputs["loss_weights"])
    return keras.Model(inputs, stats, name="lora_training")


def attend_within_segments(backbone) -> None:
    """Make every decoder block of a KerasHub Gemma read its padding mask as segment numbers.

    KerasHub's blocks merge the padding mask into a causal mask (any non-zero
    entry counts as a token); this narrows that mask to pairs of positions
    in the same segment, so that records packed into one row never see each
    other: a block-diagonal causal mask, which cuDNN's attention takes like
    any other mask. Gemma's rotary embeddings depend on relative positions
    only, so a record scores the same at any offset in its row. Unchanged:
    0/1 padding masks (one segment per row), and generation with a cache,
    whose mask is not square over the padding mask.
    """
    for block in decoder_blocks(backbone):
        wrap_attention_mask(block, _segment_mask)


def _segment_mask(compute_mask, x, padding_mask, *args):
    mask = compute_mask(x, padding_mask, *args)
    if padding_mask is None or mask.shape[-2:] != (padding_mask.shape[-1],) * 2:
        return mask
    segment = jnp.asarray(padding_mask, "int32")
    # A padding position's query (segment 0) keeps KerasHub's mask, so that no row of it is empty.
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, :, None] == 0)
    return mask * same.astype(mask.dtype)


class SegmentPositions(keras.layers.Layer):
    """Each token's position within its record, for backbones that take positions (Gemma 4).

    A row of one record is numbered 0, 1, ... as KerasHub's preprocessor
    does; in a packed row (the padding mask numbers its records) each record
    starts again at 0, so that it sees the very positions it has alone.
    """

    def call(self, padding_mask):
        segment = jnp.asarray(padding_mask, "int32")
        index = jnp.broadcast_to(jnp.arange(segment.shape[1], dtype="int32"), segment.shape)
        starts = jnp.concatenate([jnp.ones_like(segment[:, :1], bool), segment[:, 1:] != segment[:, :-1]], axis=1)
        return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)

    def compute_output_spec(self, padding_mask):
        return keras.KerasTensor(padding_mask.shape, dtype="int32")


class ResponseLoss(keras.layers.Layer):
    """Per-row [loss sum, correct] of the output projection's cross-entropy at weighted positions.

    Args:
        embedding: the backbone's output embedding (`backbones.output_embedding`),
            whose matrix gives a Gemma's logits.
        soft_cap: the logits' soft cap, or None.
    """

    def __init__(self, embedding, soft_cap: float | None = None, groups: int = 1, **kwargs):
        # No autocast: the hidden states stay in the backbone's compute dtype.
        super().__init__(autocast=False, **kwargs)
        self.embedding = embedding
        self.soft_cap = soft_cap
        self.groups = groups

    def call(self, hidden, targets, loss_weights):
        matrix = output_matrix(self.embedding)
        loss, correct = token_cross_entropy(hidden, matrix.astype(hidden.dtype), targets, loss_weights, self.soft_cap, self.groups)
        return jnp.stack([loss.sum(axis=1), correct.sum(axis=1)], axis=1)

    def compute_output_spec(self, hidden, targets, loss_weights):
        return keras.KerasTensor((hidden.shape[0], 2), dtype="float32")


def batch_mean_loss(y_true, y_pred):
    """Mean cross-entropy over the batch's weighted tokens; `y_true` is each row's weight sum."""
    return jnp.sum(y_pred[..., 0]) / jnp.maximum(jnp.sum(y_true), 1e-9)


class TokenAccuracy(keras.metrics.Metric):
    """Weighted correct predictions over weighted tokens, over every batch seen."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.tokens = self.add_variable(shape=(), initializer="zeros", name="tokens")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.correct.assign_add(jnp.sum(y_pred[..., 1]))
        self.tokens.assign_add(jnp.sum(y_true))

    def result(self):
        return self.correct.value / jnp.maximum(self.tokens.value, 1e-9)

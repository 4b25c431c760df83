"""The response-only cross-entropy against full logits, on random data and on the tiny Gemma."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorastudy.loss import chunk_rows, token_cross_entropy


def _data(seed, batch=3, width=37, dim=16, vocab=50):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, width, dim)), jnp.float32)
    embeddings = jnp.asarray(rng.normal(size=(vocab, dim)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, width)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, width)) > 0.4, jnp.float32)
    return hidden, embeddings, targets, weights


def _full_logits(hidden, embeddings, targets, weights, soft_cap):
    logits = jnp.einsum("btd,vd->btv", hidden, embeddings)
    if soft_cap is not None:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (ce * weights).sum() / weights.sum(), ((logits.argmax(-1) == targets) * weights).sum()


def _ours(hidden, embeddings, targets, weights, soft_cap):
    loss, correct = token_cross_entropy(hidden, embeddings, targets, weights, soft_cap)
    return loss.sum() / weights.sum(), correct.sum()


@pytest.mark.parametrize("soft_cap", [None, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_accuracy_and_gradient_equal_full_logits(seed, soft_cap):
    hidden, embeddings, targets, weights = _data(seed)
    # Some correct predictions, so that accuracy is tested on more than zeros.
    targets = jnp.where(jnp.arange(targets.shape[1]) % 3 == 0, jnp.einsum("btd,vd->btv", hidden, embeddings).argmax(-1), targets)
    reference, ours = _full_logits(hidden, embeddings, targets, weights, soft_cap), _ours(hidden, embeddings, targets, weights, soft_cap)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-6)
    assert float(ours[1]) == float(reference[1]) > 0
    grad = lambda f: jax.jit(jax.grad(lambda h: f(h, embeddings, targets, weights, soft_cap)[0]))(hidden)  # noqa: E731
    np.testing.assert_allclose(grad(_ours), grad(_full_logits), atol=1e-6)


def test_many_chunks_and_weights_other_than_one(monkeypatch):
    import lorastudy.loss

    monkeypatch.setitem(lorastudy.loss.LOGIT_VALUES_PER_CHUNK, jax.default_backend(), 2**12)
    hidden, embeddings, targets, weights = _data(2, batch=4, width=300, vocab=500)
    weights = weights * jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, weights.shape), jnp.float32)
    assert 5 * chunk_rows(embeddings.shape[0], 1200) < int(weights.astype(bool).sum())
    np.testing.assert_allclose(_ours(hidden, embeddings, targets, weights, None)[0],
                               _full_logits(hidden, embeddings, targets, weights, None)[0], rtol=1e-5)


def test_chunk_rows_are_the_backends_share_of_logit_values():
    import lorastudy.loss

    vocab, values = 262144, lorastudy.loss.LOGIT_VALUES_PER_CHUNK
    assert chunk_rows(vocab, 10**6, "cpu") == values["cpu"] // vocab < chunk_rows(vocab, 10**6, "gpu") == values["gpu"] // vocab
    assert chunk_rows(vocab, 10**6, "tpu") == chunk_rows(vocab, 10**6, "gpu")
    assert chunk_rows(vocab, 21, "gpu") == 24 and chunk_rows(10**9, 10**6, "cpu") == 8


def test_positions_without_loss_never_reach_the_loss_or_its_gradient():
    """Hidden states that are not finite where the weight is 0 (a filler row, padding) change nothing."""
    hidden, embeddings, targets, weights = _data(3)
    poisoned = jnp.where(weights[..., None] == 0, jnp.nan, hidden)
    loss, grad = jax.value_and_grad(lambda h: _ours(h, embeddings, targets, weights, None)[0])(poisoned)
    assert np.isfinite(float(loss)) and bool(jnp.isfinite(grad).all())
    np.testing.assert_allclose(loss, _full_logits(hidden, embeddings, targets, weights, None)[0], rtol=1e-6)


def test_the_training_model_equals_kerashub_logits_with_keras_cross_entropy(tiny_preset):
    """Loss and LoRA gradients of the training model against CausalLM's logits and Keras's masked cross-entropy."""
    import keras

    from lorastudy.training import TrainSettings, compile_for_training
    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.presets import load_causal_lm

    causal_lm = load_causal_lm(tiny_preset)
    enable_lora(causal_lm.backbone, LoraSpec(4))
    for v in causal_lm.backbone.trainable_variables:  # LoRA's B starts at zero; make the update matter
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype("float32") * 0.1)
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 300, (3, 21)).astype("int32")
    mask = np.ones((3, 20), bool)
    mask[2, 15:] = False
    weights = (rng.random((3, 20)) > 0.3).astype("float32") * mask
    x = {"token_ids": tokens[:, :-1], "padding_mask": mask, "targets": tokens[:, 1:], "loss_weights": weights}
    model = compile_for_training(causal_lm, TrainSettings(), total_steps=1)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")

    def losses(trainable):
        def ours(values):
            stats, _ = model.stateless_call(values, [v.value for v in model.non_trainable_variables], x)
            return stats[:, 0].sum() / weights.sum()

        def reference(values):
            mapping = zip(causal_lm.trainable_variables, values)
            with keras.StatelessScope(state_mapping=mapping):
                logits = causal_lm({"token_ids": x["token_ids"], "padding_mask": mask})
            return cross_entropy(x["targets"], logits, sample_weight=weights)

        return ours, reference

    values = [v.value for v in model.trainable_variables]
    assert [id(v) for v in model.trainable_variables] == [id(v) for v in causal_lm.trainable_variables]
    ours, reference = losses(values)
    np.testing.assert_allclose(ours(values), reference(values), rtol=1e-5)
    for a, b in zip(jax.grad(ours)(values), jax.grad(reference)(values)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def assert_a_record_never_sees_its_neighbour(backbone, packed) -> None:
    """In a packed row, the second record's hidden states do not move, to the bit, when the first record's tokens change."""
    from lorastudy.backbones import hidden_states
    from lorastudy.loss import SegmentPositions

    mask = packed["padding_mask"][:1]
    second = mask[0] == 2

    def hidden(token_ids):
        x = {"token_ids": token_ids, "padding_mask": mask}
        if "position_ids" in backbone.input:
            x["position_ids"] = np.asarray(SegmentPositions()(mask))
        return np.asarray(hidden_states(backbone, x))[0, second]

    changed = packed["token_ids"][:1].copy()
    changed[0, mask[0] == 1] = changed[0, mask[0] == 1][::-1] + 1
    np.testing.assert_array_equal(hidden(changed), hidden(packed["token_ids"][:1]))


def assert_packed_rows_score_each_record_alone(preset) -> None:
    """Records packed into a row (segment-numbered padding mask) give each record's loss, accuracy and
    LoRA gradient as a batch of the records alone does; without segments, they would see each other."""
    from lorastudy.lora import LoraSpec, enable_lora
    from lorastudy.loss import response_loss_model
    from lorastudy.presets import load_causal_lm
    from lorastudy.tokens import Example, collate

    causal_lm = load_causal_lm(preset)
    enable_lora(causal_lm.backbone, LoraSpec(4))
    for v in causal_lm.backbone.trainable_variables:  # LoRA's B starts at zero; make the update matter
        v.assign(np.random.default_rng(0).normal(size=v.shape).astype("float32") * 0.1)
    rng = np.random.default_rng(1)
    examples = [
        Example(i, rng.integers(4, 300, n + 1).astype("int32"), (rng.random(n) > 0.3).astype("float32"), False)
        for i, n in enumerate([9, 14, 6, 11])
    ]
    packed, _ = collate([examples[:2], examples[2:]], width=24, pad_id=0)
    alone, _ = collate([[ex] for ex in examples], width=24, pad_id=0)
    assert packed["padding_mask"][0].tolist() == [1] * 9 + [2] * 14 + [0]

    def stats(model, x):
        def total(values):
            out, _ = model.stateless_call(values, [v.value for v in model.non_trainable_variables], x)
            return out[:, 0].sum(), out

        values = [v.value for v in model.trainable_variables]
        # Jitted: run eagerly, each of Gemma 3n's and 4's many small ops compiles alone (a minute on a CPU).
        (_, out), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(values)
        return np.asarray(out), grads

    plain = response_loss_model(causal_lm)
    mixed, _ = stats(plain, packed)
    each, each_grads = stats(plain, alone)
    together, together_grads = stats(response_loss_model(causal_lm, segments=True), packed)
    for row, pair in enumerate([(0, 1), (2, 3)]):
        np.testing.assert_allclose(together[row], each[list(pair)].sum(axis=0), rtol=2e-5, atol=1e-5)
    assert not np.allclose(mixed[:, 0], together[:, 0], rtol=1e-3)
    for a, b in zip(together_grads, each_grads):
        # Sums over other layouts of the same tokens: float32 rounding, on the gradient's own scale.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4 * np.abs(b).max())
    assert_a_record_never_sees_its_neighbour(causal_lm.backbone, packed)
    # Segments change nothing for rows of one record each.
    np.testing.assert_allclose(stats(response_loss_model(causal_lm, segments=True), alone)[0], each, rtol=1e-6)


def test_packed_records_attend_only_to_themselves(tiny_preset):
    assert_packed_rows_score_each_record_alone(tiny_preset)

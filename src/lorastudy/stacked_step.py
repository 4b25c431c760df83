"""The training step of one run, mapped over a stack of adapters that share one frozen base.

The step is the finetune stage's own (`lorastudy.loss`'s training model and
Keras's AdamW, through Keras's stateless API), so an adapter trained in a
stack is the one its separate run trains; `jax.vmap` maps it over a leading
adapter axis of the LoRA factors, the optimizer state and the batch, and
shares the frozen weights, whose matrix products then see one batch as many
times taller.
"""

from __future__ import annotations

from lorastudy import internals

# XLA options of both steps. Without Triton's GEMMs, XLA autotunes only cuBLAS's
# algorithms for each matrix product: on an H200, 9 adapters of Gemma 2B's shape
# compile in 8-11 s a width instead of 15-16 s, and step as fast (within 2%;
# benchmarks/results/grouped_step_compile.csv). A grid pays this compile for each
# width of each cell; a CPU ignores the option.
XLA_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def without_fused_attention(backbone) -> None:
    """Attention through XLA rather than cuDNN's fused kernel, for steps mapped over adapters.

    JAX's batching rule for the cuDNN kernel cannot map a mask that
    broadcasts over heads (jax 0.11 reshapes it to [batch, heads, ...] and
    fails), so under `vmap` Keras tries it, logs the traceback and falls
    back to XLA at every trace. Saying so up front skips the failing attempt.
    """
    internals.without_fused_attention(backbone)


def stacked_steps(model, optimizer, compiler_options: dict | None = XLA_OPTIONS):
    """The jitted training and validation steps of one run, mapped over a leading adapter axis.

    Training: (trainable, optimizer state, alive, frozen, batch) ->
    (trainable, optimizer state, alive, [loss, correct, tokens]) per adapter;
    the frozen weights are shared, everything else has the adapter axis.
    An adapter whose loss is not finite keeps its weights and state from
    then on (`alive` turns false). Validation: (trainable, frozen, batch) ->
    [loss, correct, tokens] per adapter, for one batch shared by all.
    `compiler_options`: XLA's options for both (`XLA_OPTIONS` by default).
    """
    import jax

    train_one, validate_one = run_steps(model, optimizer)
    train = jax.jit(jax.vmap(train_one, in_axes=(0, 0, 0, None, 0)), donate_argnums=(0, 1), compiler_options=compiler_options)
    validate = jax.jit(jax.vmap(validate_one, in_axes=(0, None, None)), compiler_options=compiler_options)
    return train, validate


def run_steps(model, optimizer):
    """One adapter's training and validation steps (unjitted, unmapped), as `stacked_steps` maps them."""
    import jax
    import jax.numpy as jnp

    def statistics(trainable, frozen, batch, training):
        rows, _ = model.stateless_call(trainable, frozen, batch, training=training)
        tokens = jnp.sum(batch["loss_weights"])
        # batch_mean_loss and TokenAccuracy, as Keras's fit computes them.
        return jnp.sum(rows[:, 0]) / jnp.maximum(tokens, 1e-9), jnp.sum(rows[:, 1]), tokens

    def loss(trainable, frozen, batch):
        mean, correct, tokens = statistics(trainable, frozen, batch, True)
        return mean, (correct, tokens)

    def train_one(trainable, state, alive, frozen, batch):
        (mean, (correct, tokens)), grads = jax.value_and_grad(loss, has_aux=True)(trainable, frozen, batch)
        new_trainable, new_state = optimizer.stateless_apply(state, grads, trainable)
        alive = alive & jnp.isfinite(mean)
        keep = lambda new, old: [jnp.where(alive, n, o) for n, o in zip(new, old)]  # noqa: E731
        return keep(new_trainable, trainable), keep(new_state, state), alive, jnp.stack([mean, correct, tokens])

    def validate_one(trainable, frozen, batch):
        return jnp.stack(statistics(trainable, frozen, batch, False))

    return train_one, validate_one


def fits_device(compiled, device) -> tuple[bool, int | None, int | None]:
    """Whether a compiled step's temporary memory fits what `device` has free (always on a CPU): (fits, needed, free)."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return True, None, None
    analysis = compiled.memory_analysis()
    needed = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    free = int(stats["bytes_limit"] - stats["bytes_in_use"])
    return needed <= 0.9 * free, needed, free


def factor_slots(trainable_variables, layers) -> list[tuple[int, int]]:
    """(layer, 0 for A / 1 for B) of each trainable variable of the training model."""
    where = {id(layer.lora_kernel_a): (j, 0) for j, layer in enumerate(layers)}
    where |= {id(layer.lora_kernel_b): (j, 1) for j, layer in enumerate(layers)}
    unknown = [v.path for v in trainable_variables if id(v) not in where]
    if unknown:
        raise ValueError(f"only LoRA factors may train, but these variables are trainable too: {unknown}")
    return [where[id(v)] for v in trainable_variables]

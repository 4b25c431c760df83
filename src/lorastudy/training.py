"""What every finetune job shares, one run at a time (`lorastudy.finetune`) or a group side by side (`lorastudy.stacked`).

The `train` settings, the examples and their batch widths, KerasHub's
optimizer recipe (AdamW, no decay on norms and biases) and its schedule, the
model compiled with the study's loss, and the records a job writes (the
history, peak memory).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras

from lorastudy.io import atomic_open, atomic_path, read_jsonl
from lorastudy.lora import DEFAULT_TARGETS
from lorastudy.prompts import PromptTemplate
from lorastudy.tokens import Example, choose_widths, encode_examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The `train` section of the config (see the schema for each key)."""

    sequence_length: int = 256
    batch_size: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    mask_prompt: bool = True
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    clip_norm: float | None = None
    seed: int = 0
    log_every_n_steps: int = 10
    precision: str = "auto"
    length_bucketing: bool = True
    packing: bool = False
    pad_multiple: int = 16
    batch_widths: tuple[int, ...] | str = "auto"
    compile_seconds_per_width: float | str = "auto"
    expected_tokens_per_second: float | str = "auto"
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_alpha: float | None = None
    devices: int | str = "all"
    model_parallel: int = 1
    stack_size: int | str = "auto"
    quantize: str = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.batch_widths != "auto":
            object.__setattr__(self, "batch_widths", tuple(sorted(self.batch_widths)))
            if self.batch_widths[-1] != self.sequence_length:
                raise ValueError(f"train.batch_widths: the widest, {self.batch_widths[-1]}, must be train.sequence_length, {self.sequence_length}")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


# --------------------------------------------------------------------------
# data feeding
# --------------------------------------------------------------------------


# What "auto" means for the width cost model, by device kind: (compile seconds per
# width, training tokens per second of one run). GPU: Gemma 2B on one H100;
# CPU: Gemma 3 270M at 8 x 128 on a 2-core CPU (benchmarks/results/job_overhead.json).
WIDTH_COSTS = {"gpu": (15.0, 40000.0), "cpu": (20.0, 300.0)}


def bucket_widths(settings: TrainSettings, train: Sequence[Example], val: Sequence[Example], epochs: int, runs: int = 1) -> list[int]:
    """The batch widths of a run: one (the sequence length) with packing or without bucketing, else
    `train.batch_widths` where the config pins them, else chosen by cost.

    `runs` adapters trained side by side share each width's programs and
    pay each padded token together. Validation is batched with the same
    widths, so it adds no program shapes.
    """
    import jax

    s = settings
    if s.packing or not s.length_bucketing:
        return [s.sequence_length]
    if s.batch_widths != "auto":
        return list(s.batch_widths)
    compile_seconds, tokens_per_second = WIDTH_COSTS.get(jax.default_backend(), WIDTH_COSTS["gpu"])
    if s.compile_seconds_per_width != "auto":
        compile_seconds = float(s.compile_seconds_per_width)
    if s.expected_tokens_per_second != "auto":
        tokens_per_second = float(s.expected_tokens_per_second)
    return choose_widths(
        [ex.length for ex in train], s.sequence_length, s.pad_multiple, epochs,
        compile_seconds, tokens_per_second / runs, longest=max(ex.length for ex in val),
    )


def encode_splits(tokenizer, train_path, val_path, template: str, s: TrainSettings) -> tuple[list[Example], list[Example], dict[str, int]]:
    """The training and validation examples, and the training split's counts (logged, with a warning for truncation)."""
    prompt = PromptTemplate(template)
    train, train_counts = encode_examples(tokenizer, read_jsonl(train_path), prompt, s.sequence_length, s.mask_prompt)
    val, val_counts = encode_examples(tokenizer, read_jsonl(val_path), prompt, s.sequence_length, s.mask_prompt)
    log.info("training examples: %s; validation examples: %s", train_counts, val_counts)
    if train_counts["truncated"]:
        log.warning("%d of %d training records exceed %d tokens and were truncated", train_counts["truncated"], len(train), s.sequence_length)
    return train, val, train_counts


# --------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable("lorastudy")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then constant, cosine or linear decay to 0."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str):
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        warm = ops.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        frac = ops.clip((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        shape = {"constant": 1.0, "cosine": 0.5 * (1.0 + ops.cos(math.pi * frac)), "linear": 1.0 - frac}
        return self.peak * warm * shape[self.decay]

    def get_config(self) -> dict[str, Any]:
        return dict(peak=self.peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps, decay=self.decay)


def learning_rate(settings: TrainSettings, total_steps: int) -> float | WarmupDecay:
    """A float for `constant` without warm-up, else the schedule."""
    s = settings
    if s.lr_schedule == "constant" and s.warmup_steps == 0:
        return s.learning_rate
    return WarmupDecay(s.learning_rate, s.warmup_steps, total_steps, s.lr_schedule)


def make_optimizer(settings: TrainSettings, total_steps: int) -> keras.optimizers.AdamW:
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate(settings, total_steps),
        weight_decay=settings.weight_decay,
        global_clipnorm=settings.clip_norm,
    )
    # As in the KerasHub Gemma LoRA tutorial: no decay on norms and biases.
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    return optimizer


def compile_for_training(causal_lm, settings: TrainSettings, total_steps: int):
    """A Keras model over the task's backbone (same variables), compiled with the study's loss.

    KerasHub's `CausalLM.fit` would route arrays through its preprocessing
    pipeline (tf.data or grain) and compute logits at every position; the
    batches here are already tokens, and the loss needs logits only at the
    tokens it is weighted on (`lorastudy.loss`).
    """
    from lorastudy.distribution import data_parallel_size
    from lorastudy.loss import TokenAccuracy, batch_mean_loss, response_loss_model

    model = response_loss_model(causal_lm, groups=data_parallel_size(keras.distribution.distribution()), segments=settings.packing)
    model.compile(optimizer=make_optimizer(settings, total_steps), loss=batch_mean_loss, metrics=[TokenAccuracy()])
    return model


def peak_memory() -> dict[str, int | None]:
    """Peak memory of the fullest device (GPU; None on a CPU) and peak host resident memory."""
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return {
        "peak_device_memory_bytes": max((p for p in peaks if p is not None), default=None),
        "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def publish_adapter(checkpointed: str | os.PathLike, dest: str | os.PathLike) -> None:
    """An epoch's adapter, copied from the job's checkpoint to its final name; the name appears only once complete."""
    with atomic_path(dest, suffix=".lora.h5") as tmp:
        shutil.copyfile(checkpointed, tmp)


HISTORY_COLUMNS = ["epoch", "step", "kind", "loss", "accuracy", "val_loss", "val_accuracy", "train_seconds", "steady_train_seconds"]


def write_history(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Training history: `steps` rows (windowed means) and `epoch` rows (epoch means,
    validation, and the training seconds spent up to the end of the epoch)."""
    with atomic_open(path) as f:
        f.write(",".join(HISTORY_COLUMNS) + "\n")
        for row in rows:
            f.write(",".join("" if row.get(c) is None else str(row[c]) for c in HISTORY_COLUMNS) + "\n")

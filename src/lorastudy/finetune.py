"""The finetune stage: LoRA fine-tuning of a KerasHub preset, one adapter per epoch.

One job per (model, subset, rank) trains to the largest epoch count of the
grid and saves `adapter_epoch{e}.lora.h5` after every epoch, so the epoch axis
of the grid costs one run. With the default constant learning rate, epoch e
of that run is exactly a separate e-epoch run; a decaying schedule is laid
out over the whole run, so there it is not.

The training is KerasHub's own recipe (the Gemma LoRA tutorial):
`backbone.enable_lora(rank)`, AdamW with weight decay off for layer norms and
biases, cross-entropy and token accuracy, through Keras `fit`. The loss is
averaged over the tokens it is weighted on: the response tokens by default,
every token with `mask_prompt: false`; logits are computed at those tokens
alone (`lorastudy.loss`). Batches come in a few widths chosen for the data's
lengths, validation included, and every compiled program goes to the
persistent compilation cache that all jobs of the study share
(`lorastudy.compilation`), so each shape is compiled once per study.

An interrupted job resumes: each finished epoch leaves a checkpoint (the
adapter, the optimizer state, the history so far) that the next run of the
same job, with the same inputs and settings, continues from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastudy.checkpoints import Checkpoints, fingerprint
from lorastudy.compilation import CompileClock, use_compilation_cache
from lorastudy.distribution import distributed
from lorastudy.io import atomic_open, atomic_path, read_jsonl, write_json
from lorastudy.lora import DEFAULT_TARGETS, LoraSpec, enable_lora, initial_factors, set_factors
from lorastudy.presets import architecture, attention_heads, dtype_policies, load_causal_lm
from lorastudy.prompts import PromptTemplate
from lorastudy.tokens import Example, choose_widths, encode_examples, training_batches

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
    compile_seconds_per_width: float | str = "auto"
    expected_tokens_per_second: float | str = "auto"
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_alpha: float | None = None
    devices: int | str = "all"
    model_parallel: int = 1
    stack_size: int | str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))


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
    """The batch widths of a run: one (the sequence length) with packing or without bucketing, else chosen by cost.

    `runs` adapters trained side by side share each width's programs and
    pay each padded token together. Validation is batched with the same
    widths, so it adds no program shapes.
    """
    import jax

    s = settings
    if s.packing or not s.length_bucketing:
        return [s.sequence_length]
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


def learning_rate(settings: TrainSettings, total_steps: int):
    """A float for `constant` without warm-up, else a Keras schedule."""
    import keras

    s = settings
    if s.lr_schedule == "constant" and s.warmup_steps == 0:
        return s.learning_rate

    @keras.saving.register_keras_serializable("lorastudy")
    class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up to `peak`, then constant, cosine or linear decay to 0."""

        def __init__(self, peak, warmup_steps, total_steps, decay):
            self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay

        def __call__(self, step):
            ops = keras.ops
            step = ops.cast(step, "float32")
            warm = ops.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
            frac = ops.clip((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
            shape = {"constant": 1.0, "cosine": 0.5 * (1.0 + ops.cos(math.pi * frac)), "linear": 1.0 - frac}
            return self.peak * warm * shape[self.decay]

        def get_config(self):
            return dict(peak=self.peak, warmup_steps=self.warmup_steps, total_steps=self.total_steps, decay=self.decay)

    return WarmupDecay(s.learning_rate, s.warmup_steps, total_steps, s.lr_schedule)


def make_optimizer(settings: TrainSettings, total_steps: int):
    import keras

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
    import keras

    from lorastudy.distribution import data_parallel_size
    from lorastudy.loss import TokenAccuracy, batch_mean_loss, response_loss_model

    model = response_loss_model(causal_lm, groups=data_parallel_size(keras.distribution.distribution()), segments=settings.packing)
    model.compile(optimizer=make_optimizer(settings, total_steps), loss=batch_mean_loss, metrics=[TokenAccuracy()])
    return model


# --------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------


def _callbacks(run):
    import keras

    class Trainer(keras.callbacks.Callback):
        """Orders the batches, logs history, times training and its compilation, saves each epoch.

        Keras reports running means over the epoch: of the loss weighted by
        batch size (one size for every batch here), of the token accuracy
        weighted by loss tokens. The windowed means of the step history are
        recovered from them exactly: the mean over steps a..b is
        (W_b * m_b - W_a * m_a) / (W_b - W_a), W the cumulative weight.
        """

        def on_epoch_begin(self, epoch, logs=None):
            run.train_batches.set_epoch(epoch)
            self.epoch_start, self.compiled_at_start = time.perf_counter(), run.clock.seconds
            self.val_seconds = self.val_compile_seconds = 0.0
            self.rows = self.tokens = 0.0
            self.last = (0.0, 0.0, 0.0, 0.0)  # rows, tokens, loss mean, accuracy mean

        def on_train_batch_end(self, batch, logs=None):
            self.rows += run.settings.batch_size
            self.tokens += run.train_batches.loss_tokens(batch)
            if (batch + 1) % run.settings.log_every_n_steps:
                return
            epoch = run.epochs_done + 1
            loss, acc = _finite(logs, "loss", epoch, batch + 1), float(logs["accuracy"])
            rows0, tokens0, loss0, acc0 = self.last
            row = {
                "epoch": epoch,
                "step": run.steps_before_epoch + batch + 1,
                "kind": "steps",
                "loss": (self.rows * loss - rows0 * loss0) / (self.rows - rows0),
                "accuracy": (self.tokens * acc - tokens0 * acc0) / max(self.tokens - tokens0, 1e-9),
            }
            self.last = (self.rows, self.tokens, loss, acc)
            run.history.append(row)
            log.info("epoch %d step %d: loss %.4f accuracy %.4f", epoch, row["step"], row["loss"], row["accuracy"])

        def on_test_begin(self, logs=None):
            self.val_start, self.val_compiled_at_start = time.perf_counter(), run.clock.seconds

        def on_test_end(self, logs=None):
            self.val_seconds += time.perf_counter() - self.val_start
            self.val_compile_seconds += run.clock.seconds - self.val_compiled_at_start

        def on_epoch_end(self, epoch, logs=None):
            t = run.times
            t["train_seconds"] += time.perf_counter() - self.epoch_start - self.val_seconds
            t["train_compile_seconds"] += run.clock.seconds - self.compiled_at_start - self.val_compile_seconds
            t["validation_seconds"] += self.val_seconds
            t["validation_compile_seconds"] += self.val_compile_seconds
            e = epoch + 1
            _finite(logs, "loss", e, "end")
            _finite(logs, "val_loss", e, "end")
            run.epochs_done = e
            run.steps_before_epoch += len(run.train_batches)
            run.history.append(
                {
                    "epoch": e,
                    "step": run.steps_before_epoch,
                    "kind": "epoch",
                    "train_seconds": t["train_seconds"],
                    "steady_train_seconds": t["train_seconds"] - t["train_compile_seconds"],
                    **{k: float(v) for k, v in logs.items()},
                }
            )
            run.save_epoch(e)

    return Trainer()


def _finite(logs, key, epoch, step) -> float:
    value = float(logs[key])
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"{key} became {value} in epoch {epoch} (step {step}); training stopped and no adapter "
            "was written for this epoch. Lower train.learning_rate or set train.clip_norm."
        )
    return value


# --------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------


TIMES = ("train_seconds", "train_compile_seconds", "validation_seconds", "validation_compile_seconds")


class _Run:
    """State of one finetune job, shared by the callback and the driver."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.history: list[dict[str, Any]] = []
        # Cumulative over the whole run, resumed runs included.
        self.times = dict.fromkeys(TIMES, 0.0)
        self.epochs_done = 0
        self.steps_before_epoch = 0

    def save_epoch(self, epoch: int) -> None:
        state = {"history": self.history, "times": self.times, "steps": self.steps_before_epoch}
        self.checkpoints.save(epoch, self.backbone, self.spec, self.model.optimizer, state)
        _publish(self.checkpoints.adapter(epoch), self.adapter_paths[epoch - 1])
        log.info("epoch %d: adapter saved to %s", epoch, self.adapter_paths[epoch - 1])


def _publish(source: Path, dest: str | os.PathLike) -> None:
    with atomic_path(dest, suffix=".lora.h5") as tmp:
        shutil.copyfile(source, tmp)


def peak_memory() -> dict[str, int | None]:
    """Peak memory of the fullest device (GPU; None on a CPU) and peak host resident memory."""
    import jax

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return {
        "peak_device_memory_bytes": max((p for p in peaks if p is not None), default=None),
        "peak_host_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def finetune(
    preset: str | os.PathLike,
    train_path: str | os.PathLike,
    val_path: str | os.PathLike,
    adapter_paths: Sequence[str | os.PathLike],
    history_path: str | os.PathLike,
    stats_path: str | os.PathLike,
    rank: int,
    template: str,
    settings: dict[str, Any] | TrainSettings | None = None,
    compilation_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune `preset` with LoRA of `rank`, one epoch per entry of `adapter_paths`.

    Writes `adapter_paths[e - 1]` after epoch e, the history CSV at the end,
    and `stats_path` (train.json): parameters, tokens, where the time went
    (loading, compilation, steady-state training, validation), throughput
    and peak memory. Returns those statistics.
    """
    started = time.perf_counter()
    s = settings if isinstance(settings, TrainSettings) else TrainSettings(**(settings or {}))
    with distributed(s.devices, s.model_parallel, s.batch_size, attention_heads(preset)):
        return _finetune(
            preset, train_path, val_path, adapter_paths, history_path, stats_path, rank, template, s, compilation_cache, started
        )


def _finetune(preset, train_path, val_path, adapter_paths, history_path, stats_path, rank, template, s, compilation_cache, started):
    import jax
    import keras

    use_compilation_cache(compilation_cache)
    clock = CompileClock.get()
    programs_before, hits_before = clock.programs, clock.cache_hits
    epochs = len(adapter_paths)
    dtype, lora_policy = dtype_policies(s.precision, training=True)
    keras.utils.set_random_seed(s.seed)

    causal_lm = load_causal_lm(preset, dtype=dtype)
    backbone = causal_lm.backbone
    spec = LoraSpec(rank, s.lora_targets, s.lora_alpha)
    layers = enable_lora(backbone, spec, lora_policy)
    set_factors(layers, initial_factors(layers, rank, s.seed), spec.scale)
    tokenizer = causal_lm.preprocessor.tokenizer
    train, val, train_counts = encode_splits(tokenizer, train_path, val_path, template, s)

    widths = bucket_widths(s, train, val, epochs)
    Batches = training_batches()
    pad_id = tokenizer.pad_token_id
    train_batches = Batches(train, widths, s.batch_size, pad_id, seed=s.seed, packed=s.packing)
    val_batches = Batches(val, widths, s.batch_size, pad_id, seed=None, packed=s.packing)
    log.info("batch widths %s: %d padded tokens per epoch for %d real ones", widths, train_batches.padded_tokens(), sum(ex.length for ex in train))
    model = compile_for_training(causal_lm, s, total_steps=epochs * len(train_batches))

    run_dir = Path(adapter_paths[0]).parent
    checkpoints = Checkpoints(
        run_dir / "checkpoints",
        fingerprint(str(preset), rank, template, dataclasses.asdict(s), dtype, files=[train_path, val_path, Path(preset) / "config.json"]),
    )
    run = _Run(
        settings=s, backbone=backbone, spec=spec, model=model, train_batches=train_batches,
        checkpoints=checkpoints, adapter_paths=adapter_paths, clock=clock,
    )
    resumed_from = checkpoints.latest(epochs)
    if resumed_from:
        state = checkpoints.restore(resumed_from, backbone, model)
        run.history, run.times, run.steps_before_epoch = state["history"], state["times"], state["steps"]
        run.epochs_done = resumed_from
        for e in range(1, resumed_from + 1):
            _publish(checkpoints.adapter(e), adapter_paths[e - 1])
        log.info("resuming after epoch %d of %d from %s", resumed_from, epochs, checkpoints.dir)
    load_seconds = time.perf_counter() - started

    if resumed_from < epochs:
        model.fit(
            train_batches,
            validation_data=val_batches,
            epochs=epochs,
            initial_epoch=resumed_from,
            # The batches come in an order of their own, seeded by (seed, epoch).
            # Keras's shuffle would reorder them with Python's global random
            # state, which a resumed process does not share with the first.
            shuffle=False,
            callbacks=[_callbacks(run)],
            # One line per epoch: the step-by-step bar is terminal control codes in a log file.
            verbose=2,
        )

    tokens_per_epoch = sum(ex.length for ex in train)
    t = run.times
    steady = t["train_seconds"] - t["train_compile_seconds"]
    stats = {
        "preset": str(preset),
        "architecture": architecture(backbone),
        "rank": rank,
        "lora_targets": list(spec.targets),
        "lora_alpha": spec.alpha if spec.alpha is not None else rank,
        "epochs": epochs,
        "resumed_from_epoch": resumed_from,
        "dtype": dtype if lora_policy is None else f"{dtype}, LoRA {lora_policy}",
        "device": str(jax.devices()[0].device_kind),
        "devices": len(keras.distribution.list_devices()) if s.devices == "all" else s.devices,
        "model_parallel": s.model_parallel,
        "backend": jax.default_backend(),
        "trainable_parameters": int(sum(math.prod(v.shape) for v in model.trainable_weights)),
        "total_parameters": int(backbone.count_params()),
        "training_records": train_counts["records"],
        "training_examples": len(train),
        "truncated_examples": train_counts["truncated"],
        "skipped_examples": train_counts["skipped"],
        "validation_examples": len(val),
        "steps": run.steps_before_epoch,
        "batch_widths": widths,
        "packing": s.packing,
        "tokens_seen": tokens_per_epoch * epochs,
        "loss_tokens_seen": int(sum(ex.loss_weights.sum() for ex in train)) * epochs,
        "padded_tokens_per_epoch": train_batches.padded_tokens(),
        # Training time includes compiling its programs; steady-state time does not.
        **t,
        "steady_train_seconds": steady,
        "tokens_per_second": tokens_per_epoch * epochs / t["train_seconds"] if t["train_seconds"] else None,
        "steady_tokens_per_second": tokens_per_epoch * epochs / steady if steady > 0 else None,
        "load_seconds_this_run": load_seconds,
        "compiled_programs_this_run": clock.programs - programs_before,
        "cache_hits_this_run": clock.cache_hits - hits_before,
        "wall_seconds_this_run": time.perf_counter() - started,
        "epochs_trained_this_run": epochs - resumed_from,
        **peak_memory(),
    }
    write_history(history_path, run.history)
    write_json(stats_path, stats)
    checkpoints.clear()
    log.info("finished: %s", stats)
    return stats


HISTORY_COLUMNS = ["epoch", "step", "kind", "loss", "accuracy", "val_loss", "val_accuracy", "train_seconds", "steady_train_seconds"]


def write_history(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Training history: `steps` rows (windowed means) and `epoch` rows (epoch means,
    validation, and the training seconds spent up to the end of the epoch)."""
    with atomic_open(path) as f:
        f.write(",".join(HISTORY_COLUMNS) + "\n")
        for row in rows:
            f.write(",".join("" if row.get(c) is None else str(row[c]) for c in HISTORY_COLUMNS) + "\n")

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
from dataclasses import dataclass, field
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from lorastudy.checkpoints import Checkpoints, fingerprint
from lorastudy.compilation import CompileClock, use_compilation_cache
from lorastudy.distribution import distributed
from lorastudy.io import write_json
from lorastudy.lora import LoraSpec, enable_lora, initial_factors, set_factors
from lorastudy.presets import architecture, attention_heads, dtype_policies, load_causal_lm
from lorastudy.tokens import collate, epoch_batches, pack_rows
from lorastudy.training import (
    NonFiniteLossError,
    TrainSettings,
    bucket_widths,
    compile_for_training,
    encode_splits,
    peak_memory,
    publish_adapter,
    write_history,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------


class Batches(keras.utils.PyDataset):
    """Length-bucketed or packed batches of fixed shapes; the order is a function of (seed, epoch).

    Making the order depend on the epoch number alone (not on how many
    epochs this process has run) is what lets a resumed run see the same
    batches as an uninterrupted one. Packed (`packed=True`, one width):
    the rows are packed once and shuffled each epoch, as TRL does.
    """

    def __init__(self, examples, widths, batch_size, pad_id, seed=None, packed=False):
        super().__init__()
        self.examples, self.widths, self.batch_size, self.pad_id, self.seed = examples, widths, batch_size, pad_id, seed
        if packed and len(widths) != 1:
            raise ValueError(f"packed batches have one width, the sequence length; got {widths}")
        self.rows = pack_rows([ex.length for ex in examples], widths[0]) if packed else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        lengths = [ex.length for ex in self.examples]
        self.batches = epoch_batches(lengths, self.widths, self.batch_size, self.seed, epoch, self.rows)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        b = self.batches[index]
        return collate([[self.examples[i] for i in row] for row in b.rows], b.width, self.pad_id, b.real)

    def padded_tokens(self) -> int:
        return sum(len(b.rows) * b.width for b in self.batches)

    def loss_tokens(self, index: int) -> float:
        return float(sum(self.examples[i].loss_weights.sum() for i in self.batches[index].examples()))


# --------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------


class _Recorder(keras.callbacks.Callback):
    """Orders the batches, logs history, times training and its compilation, saves each epoch.

    Keras reports running means over the epoch: of the loss weighted by
    batch size (one size for every batch here), of the token accuracy
    weighted by loss tokens. The windowed means of the step history are
    recovered from them exactly: the mean over steps a..b is
    (W_b * m_b - W_a * m_a) / (W_b - W_a), W the cumulative weight.
    """

    def __init__(self, run: _Run):
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch, logs=None):
        run = self.run
        run.train_batches.set_epoch(epoch)
        self.epoch_start, self.compiled_at_start = time.perf_counter(), run.clock.seconds
        self.val_seconds = self.val_compile_seconds = 0.0
        self.rows = self.tokens = 0.0
        self.last = (0.0, 0.0, 0.0, 0.0)  # rows, tokens, loss mean, accuracy mean

    def on_train_batch_end(self, batch, logs=None):
        run = self.run
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
        self.val_start, self.val_compiled_at_start = time.perf_counter(), self.run.clock.seconds

    def on_test_end(self, logs=None):
        self.val_seconds += time.perf_counter() - self.val_start
        self.val_compile_seconds += self.run.clock.seconds - self.val_compiled_at_start

    def on_epoch_end(self, epoch, logs=None):
        run = self.run
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


@dataclass
class _Run:
    """State of one finetune job, shared by the callback and the driver."""

    settings: TrainSettings
    backbone: Any
    spec: LoraSpec
    model: Any  # the training model (compile_for_training)
    train_batches: Batches
    checkpoints: Checkpoints
    adapter_paths: Sequence[str | os.PathLike]
    clock: CompileClock
    history: list[dict[str, Any]] = field(default_factory=list)
    # Cumulative over the whole run, resumed runs included.
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMES, 0.0))
    epochs_done: int = 0
    steps_before_epoch: int = 0

    def save_epoch(self, epoch: int) -> None:
        state = {"history": self.history, "times": self.times, "steps": self.steps_before_epoch}
        self.checkpoints.save(epoch, self.backbone, self.spec, self.model.optimizer, state)
        publish_adapter(self.checkpoints.adapter(epoch), self.adapter_paths[epoch - 1])
        log.info("epoch %d: adapter saved to %s", epoch, self.adapter_paths[epoch - 1])


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
        files = RunFiles(preset, train_path, val_path, adapter_paths, history_path, stats_path)
        return _finetune(files, rank, template, s, compilation_cache, started)


@dataclass(frozen=True)
class RunFiles:
    """What one finetune job reads (the preset, the training and validation splits) and writes."""

    preset: str | os.PathLike
    train_path: str | os.PathLike
    val_path: str | os.PathLike
    adapter_paths: Sequence[str | os.PathLike]
    history_path: str | os.PathLike
    stats_path: str | os.PathLike


def _finetune(files: RunFiles, rank: int, template: str, s: TrainSettings, compilation_cache: dict | None, started: float) -> dict[str, Any]:
    import jax

    preset, train_path, val_path, adapter_paths = files.preset, files.train_path, files.val_path, files.adapter_paths
    use_compilation_cache(compilation_cache)
    clock = CompileClock.get()
    programs_before, hits_before = clock.programs, clock.cache_hits
    epochs = len(adapter_paths)
    dtype, lora_policy = dtype_policies(s.precision, training=True)
    keras.utils.set_random_seed(s.seed)

    causal_lm = load_causal_lm(preset, dtype=dtype, remat=s.gradient_checkpointing)
    backbone = causal_lm.backbone
    spec = LoraSpec(rank, s.lora_targets, s.lora_alpha)
    layers = enable_lora(backbone, spec, lora_policy, s.quantize)
    set_factors(layers, initial_factors(layers, rank, s.seed), spec.scale)
    tokenizer = causal_lm.preprocessor.tokenizer
    train, val, train_counts = encode_splits(tokenizer, train_path, val_path, template, s)

    widths = bucket_widths(s, train, val, epochs)
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
            publish_adapter(checkpoints.adapter(e), adapter_paths[e - 1])
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
            callbacks=[_Recorder(run)],
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
        "quantize": s.quantize,
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
    write_history(files.history_path, run.history)
    write_json(files.stats_path, stats)
    checkpoints.clear()
    log.info("finished: %s", stats)
    return stats

"""One wave of a grouped finetune job (`lorastudy.stacked`): the group's shared base and data, and adapters trained together.

`Group` is what every wave of a job shares: the base loaded once with LoRA
enabled at the group's largest rank, the examples, the batch widths. `Wave`
trains some of the group's adapters side by side, epoch by epoch: their
stacked factors and optimizer state, the step mapped over them, validation,
checkpoints, and each run's files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy import resident
from lorastudy.ahead import AheadPrograms
from lorastudy.checkpoints import WaveCheckpoint, fingerprint
from lorastudy.internals import lora_layer_indices
from lorastudy.io import write_json
from lorastudy.lora import LoraSpec, enable_lora, initial_factors, pad_rank, write_adapter
from lorastudy.presets import architecture, dtype_policies, load_causal_lm
from lorastudy.stacked_step import factor_slots, fits_device, stacked_steps, without_fused_attention
from lorastudy.tokens import Batch, Example, epoch_batches, pack_rows, stack_batches
from lorastudy.training import (
    TrainSettings,
    bucket_widths,
    encode_splits,
    learning_rate,
    make_optimizer,
    peak_memory,
    publish_adapter,
    write_history,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupRun:
    """One run of a group: its adapter's rank and seed, and its files (an adapter per epoch)."""

    name: str
    rank: int
    seed: int
    adapter_paths: tuple[str, ...]
    history_path: str
    stats_path: str


# --------------------------------------------------------------------------
# the group: base, data and programs shared by every wave
# --------------------------------------------------------------------------


@dataclass
class Group:
    preset: str
    settings: TrainSettings
    template: str
    epochs: int
    causal_lm: Any
    model: Any  # the training model (lorastudy.loss.response_loss_model)
    layers: list
    rank: int  # of the variables: the group's largest
    train: list[Example]
    val: list[Example]
    counts: dict[str, int]
    widths: list[int]
    pad_id: int
    files: list[str]
    dtype: str
    train_rows: list | None = None  # the packed rows (train.packing), packed once
    val_rows: list | None = None
    base_reused: bool = False  # the base and its traced steps came from the previous job (lorastudy.resident)

    @classmethod
    def load(cls, preset, train_path, val_path, runs, template, s: TrainSettings, epochs: int) -> Group:
        rank = max(run.rank for run in runs)
        key = (str(Path(preset).resolve()), resident.preset_files(preset), s.precision, s.gradient_checkpointing, rank,
               s.lora_targets, s.quantize, s.packing)
        (causal_lm, model, layers, dtype), reused = resident.base(key, lambda: _load_base(preset, s, rank))
        if reused:
            log.info("the base of %s and its traced steps are the previous job's (the same preset files and settings)", preset)
        tokenizer = causal_lm.preprocessor.tokenizer
        train, val, counts = encode_splits(tokenizer, train_path, val_path, template, s)
        widths = bucket_widths(s, train, val, epochs, runs=len(runs))
        files = [str(train_path), str(val_path), str(Path(preset) / "config.json")]
        rows = [pack_rows([ex.length for ex in split], widths[0]) for split in (train, val)] if s.packing else [None, None]
        return cls(str(preset), s, template, epochs, causal_lm, model, layers, rank, train, val, counts, widths,
                   tokenizer.pad_token_id, files, dtype, *rows, base_reused=reused)

    def plan(self, seed: int | None, epoch: int, examples: Sequence[Example]) -> list[Batch]:
        """One run's batches of an epoch, exactly as its separate run orders them (`finetune.Batches`)."""
        s = self.settings
        rows = (self.train_rows if examples is self.train else self.val_rows) if s.packing else None
        return epoch_batches([ex.length for ex in examples], self.widths, s.batch_size, seed, epoch, rows)

    def stack(self, batches: Sequence[Batch], examples: Sequence[Example]) -> dict[str, np.ndarray]:
        return stack_batches(batches, examples, self.pad_id)


def _load_base(preset, s: TrainSettings, rank: int) -> tuple[Any, Any, list, str]:
    """The base with LoRA enabled at `rank`, its training model, its LoRA layers, and its dtypes in words."""
    from lorastudy.loss import response_loss_model

    dtype, lora_policy = dtype_policies(s.precision, training=True)
    causal_lm = load_causal_lm(preset, dtype=dtype, remat=s.gradient_checkpointing)
    layers = enable_lora(causal_lm.backbone, LoraSpec(rank, s.lora_targets), lora_policy, s.quantize)
    without_fused_attention(causal_lm.backbone)
    model = response_loss_model(causal_lm, segments=s.packing)
    return causal_lm, model, layers, dtype if lora_policy is None else f"{dtype}, LoRA {lora_policy}"


class Wave:
    """Adapters trained together: their stacked weights, optimizer state and bookkeeping."""

    def __init__(self, trainer: Any, runs: Sequence[GroupRun]):
        import jax
        import jax.numpy as jnp

        self.trainer, self.runs, self.group = trainer, list(runs), trainer.group
        g, s = self.group, self.group.settings
        self.steps_per_epoch = len(g.plan(0, 0, g.train))
        total_steps = g.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(s, total_steps)
        self.optimizer.build(g.model.trainable_variables)
        self.slots = factor_slots(g.model.trainable_variables, g.layers)
        starts = [initial_factors(g.layers, run.rank, run.seed) for run in self.runs]
        self.trainable = [jnp.asarray(np.stack([pad_rank(f[j][ab], g.rank, -1 if ab == 0 else 0) for f in starts]))
                          for j, ab in self.slots]
        k = len(self.runs)
        self.state = [jnp.broadcast_to(v.value, (k, *v.shape)) + 0 for v in self.optimizer.variables]
        self.alive = jnp.ones((k,), bool)
        self.frozen = [v.value for v in g.model.non_trainable_variables]
        # The traced steps depend on LoRA's scale (the layers' alpha) and the optimizer, besides the base.
        schedule = None if isinstance(learning_rate(s, total_steps), (int, float)) else total_steps
        key = (tuple(layer.lora_alpha for layer in g.layers), json.dumps(dataclasses.asdict(s), sort_keys=True, default=str), schedule)
        self.train_step, self.validate_step = resident.steps(key, lambda: stacked_steps(g.model, self.optimizer))
        self.programs = AheadPrograms()  # keyed by ("train" or "validation", width)
        self.history: list[list[dict[str, Any]]] = [[] for _ in self.runs]
        self.times = dict.fromkeys(("train_seconds", "train_compile_seconds", "validation_seconds", "validation_compile_seconds"), 0.0)
        self.failed: dict[int, str] = {}
        self.device = jax.devices()[0]
        key = [g.preset, [dataclasses.asdict(r) | {"stats_path": None} for r in self.runs], g.template,
               dataclasses.asdict(s), g.dtype, g.rank]
        self.checkpoint = WaveCheckpoint(trainer.checkpoint_dir / _wave_name(self.runs), fingerprint(*key, files=g.files))

    # -- training ----------------------------------------------------------

    def train(self, adaptive: bool) -> list[dict[str, Any]] | None:
        g = self.group
        if self.trainer.load_seconds is None:
            self.trainer.load_seconds = time.perf_counter() - self.trainer.started
        resumed = self._restore()
        if resumed:
            log.info("resuming %s after epoch %d of %d from %s", _wave_name(self.runs), resumed, g.epochs, self.checkpoint.dir)
        try:
            check = not resumed and adaptive and len(self.runs) > 1
            self._compile_ahead(resumed, widest_first=check)
            if check and not self._fits():
                return None
            log.info("training %d adapters side by side: %s", len(self.runs), ", ".join(r.name for r in self.runs))
            for epoch in range(resumed, g.epochs):
                self._epoch(epoch)
                self._validate(epoch)
                self._save(epoch + 1)
        finally:
            self.programs.close()
        return [self._finish(k) for k in range(len(self.runs))]

    def _save(self, epoch: int) -> None:
        """Each live run's adapter (published under its final name), then the wave's arrays and bookkeeping."""
        g = self.group
        for k, run in enumerate(self.runs):
            if k not in self.failed:
                spec = LoraSpec(run.rank, g.settings.lora_targets, g.settings.lora_alpha)
                write_adapter(self.checkpoint.adapter(run.name, epoch), spec, lora_layer_indices(g.causal_lm.backbone), self.factors(k))
                self.publish(k, epoch)
        state = {"history": self.history, "times": self.times, "failed": {str(k): v for k, v in self.failed.items()}}
        self.checkpoint.save(epoch, [*self.trainable, *self.state, self.alive], state)
        log.info("epoch %d: adapters of %s saved", epoch, _wave_name(self.runs))

    def _restore(self) -> int:
        """The epoch the wave's checkpoint ends (0 without one), its state put back and its adapters published."""
        import jax.numpy as jnp

        saved = self.checkpoint.restore()
        if saved is None:
            return 0
        epoch, arrays, state = saved
        n = len(self.trainable)
        arrays = [jnp.asarray(a) for a in arrays]
        self.trainable, self.state, self.alive = arrays[:n], arrays[n:-1], arrays[-1]
        self.history, self.times = state["history"], state["times"]
        self.failed = {int(k): v for k, v in state["failed"].items()}
        for k, run in enumerate(self.runs):
            for e in range(1, epoch + 1):
                if self.checkpoint.adapter(run.name, e).is_file():
                    self.publish(k, e)
        return epoch

    def _compile_ahead(self, first_epoch: int, widest_first: bool) -> None:
        """Start compiling every step the wave will take (`AheadPrograms`), the widest first for `_fits`."""
        g = self.group
        plans = [[g.plan(run.seed, epoch, g.train) for run in self.runs] for epoch in range(first_epoch, g.epochs)]
        used = (max(b.width for b in step) for epoch in plans for step in zip(*epoch))
        widths = dict.fromkeys([g.widths[-1]] * widest_first + list(used))
        example = g.stack(g.plan(0, 0, g.train)[:1] * len(self.runs), g.train)  # [adapters, batch, width]
        began = self.programs.seconds
        for width in widths:
            batch = {key: np.zeros((*value.shape[:2], width), value.dtype) for key, value in example.items()}
            self.programs.submit(("train", width), self.train_step, self.trainable, self.state, self.alive, self.frozen, batch)
        for width in dict.fromkeys(b.width for b in g.plan(None, 0, g.val)):
            batch = {key: np.zeros((value.shape[1], width), value.dtype) for key, value in example.items()}
            self.programs.submit(("validation", width), self.validate_step, self.trainable, self.frozen, batch)
        # Training's programs are most of them: the tracing counts in training's time (and its compilation's).
        traced = self.programs.seconds - began
        self.times["train_seconds"] += traced
        self.times["train_compile_seconds"] += traced
        # Part of the compiling, apart: with a warm cache it is what a job still pays.
        self.times["tracing_seconds"] = self.times.get("tracing_seconds", 0.0) + traced

    def _fits(self) -> bool:
        """Whether the step at the widest width fits: its memory against the device's free memory."""
        g, began = self.group, time.perf_counter()
        program = self._program(g.widths[-1])
        self.times["train_seconds"] += time.perf_counter() - began
        fits, needed, free = fits_device(program, self.device)
        if needed is not None:
            log.info("%d adapters side by side: the widest step needs %.2f GiB, %.2f GiB free", len(self.runs), needed / 2**30, free / 2**30)
        return fits

    def _program(self, width: int, kind: str = "train"):
        """The compiled step of this width (`_compile_ahead` started it), its wait counted as compiling."""
        waited = self.programs.seconds
        program = self.programs.get((kind, width))
        self.times[f"{kind}_compile_seconds"] += self.programs.seconds - waited
        return program

    def _epoch(self, epoch: int) -> None:
        g, s = self.group, self.group.settings
        plans = [g.plan(run.seed, epoch, g.train) for run in self.runs]
        began = time.perf_counter()
        stats, logged = [], 0
        for step in range(self.steps_per_epoch):
            batch = g.stack([plan[step] for plan in plans], g.train)
            program = self._program(batch["token_ids"].shape[-1])
            self.trainable, self.state, self.alive, row = program(self.trainable, self.state, self.alive, self.frozen, batch)
            stats.append(row)
            if (step + 1) % s.log_every_n_steps == 0:
                self._log_steps(epoch, step + 1, _rows(stats[logged:]))
                logged = step + 1
        self.epoch_stats = _rows(stats)  # [steps, adapters, (loss, correct, tokens)]
        self.times["train_seconds"] += time.perf_counter() - began

    def _log_steps(self, epoch: int, step: int, window: np.ndarray) -> None:
        for k, run in enumerate(self.runs):
            if k in self.failed:
                continue
            loss, acc = _means(window[:, k])
            row = {"epoch": epoch + 1, "step": epoch * self.steps_per_epoch + step, "kind": "steps", "loss": loss, "accuracy": acc}
            self.history[k].append(row)
            log.info("%s: epoch %d step %d: loss %.4f accuracy %.4f", run.name, epoch + 1, row["step"], loss, acc)

    def _validate(self, epoch: int) -> None:
        g = self.group
        began = time.perf_counter()
        # One batch shared by every adapter: the [1, batch, width] stack of one, without its first axis.
        batches = [{key: x[0] for key, x in g.stack([b], g.val).items()} for b in g.plan(None, 0, g.val)]
        rows = [self._program(b["token_ids"].shape[-1], "validation")(self.trainable, self.frozen, b) for b in batches]
        val = _rows(rows)
        self.times["validation_seconds"] += time.perf_counter() - began
        alive = np.asarray(self.alive)
        steady = (self.times["train_seconds"] - self.times["train_compile_seconds"]) / len(self.runs)
        for k, run in enumerate(self.runs):
            if k in self.failed:
                continue
            loss, acc = _means(self.epoch_stats[:, k])
            val_loss, val_acc = _means(val[:, k])
            if not (alive[k] and math.isfinite(val_loss)):
                self.failed[k] = f"epoch {epoch + 1}"
                log.error("%s: the loss became NaN or infinite in epoch %d; this adapter stops here, the others go on", run.name, epoch + 1)
                continue
            self.history[k].append({
                "epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch, "kind": "epoch",
                # A run's share of the wave's time: the wave's seconds over its adapters.
                "train_seconds": self.times["train_seconds"] / len(self.runs), "steady_train_seconds": steady,
                "loss": loss, "accuracy": acc, "val_loss": val_loss, "val_accuracy": val_acc,
            })

    # -- outputs -------------------------------------------------------------

    def factors(self, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Adapter k's (A, B) per layer, at the variables' rank."""
        by_slot = {slot: np.asarray(value[k]) for slot, value in zip(self.slots, self.trainable)}
        return [(by_slot[(j, 0)], by_slot[(j, 1)]) for j in range(len(self.group.layers))]

    def publish(self, k: int, epoch: int) -> None:
        run = self.runs[k]
        publish_adapter(self.checkpoint.adapter(run.name, epoch), run.adapter_paths[epoch - 1])

    def _finish(self, k: int) -> dict[str, Any]:
        import jax

        g, s, run, t = self.group, self.group.settings, self.runs[k], self.times
        if k in self.failed:
            return {"run": run.name, "failed": self.failed[k]}
        n = len(self.runs)
        share = {key: value / n for key, value in t.items()}
        steady = share["train_seconds"] - share["train_compile_seconds"]
        tokens_per_epoch = sum(ex.length for ex in g.train)
        spec = LoraSpec(run.rank, s.lora_targets, s.lora_alpha)
        stats = {
            "preset": g.preset,
            "architecture": architecture(g.causal_lm.backbone),
            "rank": run.rank,
            "seed": run.seed,
            "lora_targets": list(spec.targets),
            "lora_alpha": spec.alpha if spec.alpha is not None else run.rank,
            "epochs": g.epochs,
            "resumed_from_epoch": self.checkpoint.resumed_from,
            "dtype": g.dtype,
            "quantize": s.quantize,
            "device": str(jax.devices()[0].device_kind),
            "devices": 1,
            "model_parallel": 1,
            "backend": jax.default_backend(),
            "trainable_parameters": int(sum(a[..., : run.rank].size + b[: run.rank].size for a, b in self.factors(k))),
            "total_parameters": int(g.causal_lm.backbone.count_params()),
            "training_records": g.counts["records"],
            "training_examples": len(g.train),
            "truncated_examples": g.counts["truncated"],
            "skipped_examples": g.counts["skipped"],
            "validation_examples": len(g.val),
            "steps": g.epochs * self.steps_per_epoch,
            "batch_widths": g.widths,
            "packing": s.packing,
            "tokens_seen": tokens_per_epoch * g.epochs,
            "loss_tokens_seen": int(sum(ex.loss_weights.sum() for ex in g.train)) * g.epochs,
            # A run's share of its wave: the wave's seconds over its adapters.
            **share,
            "steady_train_seconds": steady,
            "tokens_per_second": tokens_per_epoch * g.epochs / share["train_seconds"] if share["train_seconds"] else None,
            "steady_tokens_per_second": tokens_per_epoch * g.epochs / steady if steady > 0 else None,
            "runs_side_by_side": n,
            "wave": [r.name for r in self.runs],
            "wave_seconds": t,
            "load_seconds_this_run": self.trainer.load_seconds,
            "base_from_previous_job": g.base_reused,
            "compiled_programs_this_run": len(self.programs),
            "wall_seconds_this_run": time.perf_counter() - self.trainer.started,
            "epochs_trained_this_run": g.epochs - self.checkpoint.resumed_from,
            **peak_memory(),
        }
        write_history(run.history_path, self.history[k])
        write_json(run.stats_path, stats)
        log.info("%s finished: %s", run.name, stats)
        return stats


def _rows(rows: Sequence[Any]) -> np.ndarray:
    """Per-step device rows as one host array.

    Each row is fetched and stacked on the host: `jnp.stack` of an epoch's
    rows compiled a program of one operand per step, new for each epoch
    length (on the H200, 6.0 s for the 15k subset's 2,170 steps, with the GPU
    idle; fetching them takes 0.2 s).
    """
    import jax

    return np.stack(jax.device_get(list(rows)))


def _means(rows: np.ndarray) -> tuple[float, float]:
    """The mean batch loss and the token accuracy of [steps, (loss, correct, tokens)] rows."""
    return float(np.mean(rows[:, 0])), float(rows[:, 1].sum() / max(rows[:, 2].sum(), 1e-9))


def _wave_name(runs: Sequence[GroupRun]) -> str:
    return "+".join(run.name for run in runs)

"""Adapters trained side by side on one frozen base: one finetune job for a group of runs.

The runs of a grid that share a model and a training subset differ only in
their adapters (rank, seed). Trained one process each, every run loads the
base, compiles its programs and feeds the GPU a few rows at a time. Here one
process loads the base once and trains every adapter of the group at once:
the training step of one run (the model, loss and optimizer of
`lorastudy.finetune`, through Keras's stateless API) is mapped over the
adapters with `jax.vmap`, the frozen weights shared. The base's matrix
products see one batch as many times taller; each adapter keeps its own
factors, optimizer state, gradient clipping and loss average, and its own
batches (its seed's order). A step's rows are padded to the widest of the
runs' batches at that step; padding is masked, so it changes no result.

Ranks may differ: every adapter lives in variables of the group's largest
rank, zero-padded. The padding adds nothing to A·B and its gradients are
zero, so it stays zero under AdamW. Each adapter is therefore the one its
separate run gives, to rounding (tests/test_stacked.py). LoRA's scale
(alpha / rank) is a constant of the compiled step, so adapters of different
scales (a fixed `lora_alpha` with several ranks) train in separate waves of
the same process.

A wave holds as many adapters as fit the device: the step for the widest
batch is compiled first and its temporary memory checked against what the
device has free, halving the wave until it fits (`train.stack_size`).
Each run's files are those of a separate run (adapters per epoch,
history.csv, train.json), so scoring and the report do not change. An
adapter whose loss turns non-finite stops alone (its updates are masked from
that step on), is named in the log, and the others finish; the job then
fails naming it. Each finished epoch leaves a checkpoint of the wave, so a
killed job resumes after it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorastudy import resident
from lorastudy.compilation import use_compilation_cache
from lorastudy.lora import LoraSpec
from lorastudy.stacked_wave import Group, GroupRun, Wave
from lorastudy.training import NonFiniteLossError, TrainSettings

log = logging.getLogger(__name__)


def finetune_group(
    preset: str | os.PathLike,
    train_path: str | os.PathLike,
    val_path: str | os.PathLike,
    runs: Sequence[GroupRun | dict[str, Any]],
    template: str,
    checkpoint_dir: str | os.PathLike,
    settings: dict[str, Any] | TrainSettings | None = None,
    compilation_cache: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every run's adapter side by side on one load of `preset`; write each run's files.

    `settings` is the `train` section (its `seed` is ignored: each run has
    its own); `runs` are GroupRuns or their fields (`paths.group_runs`).
    Returns each run's statistics, as written to its train.json.
    """
    started = time.perf_counter()
    runs = [run if isinstance(run, GroupRun) else GroupRun(**run) for run in runs]
    s = settings if isinstance(settings, TrainSettings) else TrainSettings(**(settings or {}))
    epochs = {len(run.adapter_paths) for run in runs}
    if len(epochs) != 1:
        raise ValueError(f"the runs of a group train the same epochs; got {sorted(epochs)}")
    use_compilation_cache(compilation_cache)
    _one_device()
    try:
        group = Group.load(preset, train_path, val_path, runs, template, s, epochs.pop())
        trainer = _Trainer(group, Path(checkpoint_dir), started)
        stats = [trainer.train(wave) for wave in waves_by_scale(runs, s.lora_alpha)]
    except BaseException:
        resident.release()  # what a failed job built is not handed to the next
        raise
    resident.end_of_job()
    results = [run_stats for wave in stats for run_stats in wave]
    failed = [r["run"] for r in results if r.get("failed")]
    if failed:
        raise NonFiniteLossError(
            f"the loss of {', '.join(failed)} became NaN or infinite; the other runs of the group finished and were "
            f"written, and {checkpoint_dir} keeps them for a rerun. Lower train.learning_rate or set train.clip_norm."
        )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return results


def _one_device() -> None:
    import jax

    if len(jax.devices()) > 1:
        log.warning(
            "%d devices are visible, and a grouped job trains on the first alone: give finetune jobs one GPU each "
            "(resources.finetune.gpu: 1) so that groups run side by side, or set jobs: per_run for jobs over several",
            len(jax.devices()),
        )


def waves_by_scale(runs: Sequence[GroupRun], alpha: float | None) -> list[list[GroupRun]]:
    """The runs split by LoRA scale (alpha / rank), which is a constant of a compiled step: one wave without a fixed alpha."""
    scales: dict[float, list[GroupRun]] = {}
    for run in runs:
        scales.setdefault(1.0 if alpha is None else alpha / run.rank, []).append(run)
    return list(scales.values())


class _Trainer:
    """The group's waves, one after the other: each wave's LoRA scale set, and its size halved until it fits the device."""

    def __init__(self, group: Group, checkpoint_dir: Path, started: float):
        self.group, self.checkpoint_dir, self.started = group, checkpoint_dir, started
        self.load_seconds: float | None = None

    def train(self, runs: Sequence[GroupRun]) -> list[dict[str, Any]]:
        """Train one wave (one LoRA scale), split further where the device's memory asks; each run's stats."""
        g, s = self.group, self.group.settings
        scale = LoraSpec(runs[0].rank, s.lora_targets, s.lora_alpha).scale  # one per wave (waves_by_scale)
        for layer in g.layers:
            layer.lora_alpha = scale * g.rank
        size = len(runs) if s.stack_size == "auto" else min(len(runs), int(s.stack_size))
        done: list[dict[str, Any]] = []
        while len(done) < len(runs):
            part = runs[len(done) : len(done) + size]
            result = Wave(self, part).train(adaptive=s.stack_size == "auto")
            if result is None:  # did not fit the device
                size = max(1, len(part) // 2)
                log.info("%d adapters side by side do not fit the device; trying %d", len(part), size)
                continue
            done += result
        return done

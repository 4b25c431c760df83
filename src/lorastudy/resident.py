"""The grouped trainer's base and traced steps, kept from one finetune job to the next of the same model.

A grid's finetune jobs of one model (one per training subset) load the same
base with LoRA enabled at the same largest rank and trace the same training
and validation steps: their batches differ, the batches' shapes do not. In
the resident worker (`lorastudy.worker`) the next job of the same model
takes the base, and the jitted steps with every program JAX traced for them,
from the job before. On an H200 each later job of the Gemma 2B half spent
about 5 s loading and 22.5 s tracing the twelve programs that the first had
traced, with the GPU idle; with the base kept, 1.4 s and 0.1 s
(benchmarks/results/study_gpu.md, h200_o and h200_p).

What is reused is keyed by everything it is built from. The base: the
preset's files (paths, sizes, modification times) and the settings that
build it (precision, gradient checkpointing, LoRA targets and rank,
quantization, packing). The steps, within one base: the LoRA scale (a
constant of a traced step) and the training settings, with the number of
steps where the learning rate follows a schedule. A key that differs is a
new load; the old base is dropped first. Outside a resident worker
(`keep` false) nothing outlives its job.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

keep = False  # the resident worker sets it: a job's base stays for the next job
USER = "lorastudy.stacked.finetune_group"  # the one job that takes a held base; the worker drops it before any other
_held: dict[str, Any] = {}  # {"key": the base's key, "base": the base, "steps": {key: steps}}


def preset_files(preset: str | os.PathLike) -> tuple:
    """The preset's files as (path, size, modification time): what a reused base must not have missed."""
    root = Path(preset).resolve()
    stats = ((p, p.stat()) for p in sorted(root.rglob("*")) if p.is_file())
    return tuple((str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p, st in stats)


def base(key: Hashable, load: Callable[[], Any]) -> tuple[Any, bool]:
    """The base kept for `key` and True, or `load()`'s (kept for the next job) and False."""
    if _held.get("key") == key:
        return _held["base"], True
    release()
    value = load()
    _held.update(key=key, base=value, steps={})
    return value, False


def steps(key: Hashable, make: Callable[[], Any]) -> Any:
    """The held base's steps for `key` (with the programs traced for them), or `make()`'s, kept with it."""
    kept = _held["steps"]  # a wave's steps come after its group's base
    if key not in kept:
        kept[key] = make()
    return kept[key]


def held() -> bool:
    return "base" in _held


def end_of_job() -> None:
    """What the job leaves: the base for the next job in a resident worker, nothing elsewhere."""
    if not keep:
        release()


def release() -> None:
    """Drop the held base and its steps (their programs go with them: JAX caches them by function).

    In the resident worker, Keras's session and JAX's in-memory programs are
    cleared too, as after any job there (`lorastudy.worker`): the next job
    starts as in a fresh process.
    """
    if not _held:
        return
    _held.clear()
    if keep:
        forget_programs()
    gc.collect()


def forget_programs() -> None:
    """Clear Keras's session and JAX's in-memory programs, where either is imported: what a job leaves behind."""
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()

"""Programs compiled ahead of their first use, several at once.

A grouped finetune job runs one training step per batch width and one
validation step per validation width: up to a dozen programs of the whole
model. Compiled one by one as the first batch of each width comes, a cold
compilation cache cost the Gemma 2B part of config/paper.yaml 146 s of an
otherwise busy GPU (benchmarks/results/study_gpu.md). XLA's compiler works
on one core per program and lets go of Python's lock while it does, so
every program is traced here first (on the caller's thread: Keras's state is
per thread) and each compiled on a thread of its own; the first step waits
only for its own program.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class AheadPrograms:
    """Compiled programs by key: `submit` traces one and starts compiling it, `get` waits for it.

    `seconds` is the time the caller spent tracing and waiting, the part of
    compiling that held up the job.

    Example:
        programs = AheadPrograms()
        for width in widths:
            programs.submit(width, step, *example_arguments(width))
        step_at_64 = programs.get(64)
    """

    def __init__(self, threads: int | None = None) -> None:
        self.compiled: dict[Hashable, Any] = {}
        self.pending: dict[Hashable, Future] = {}
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="compile")

    def __contains__(self, key: Hashable) -> bool:
        return key in self.compiled or key in self.pending

    def __len__(self) -> int:
        return len(self.compiled) + len(self.pending)

    def submit(self, key: Hashable, step, *args) -> None:
        """Trace the jitted `step` for `args` now and compile it on a thread (nothing if `key` is known)."""
        if key in self:
            return
        began = time.perf_counter()
        lowered = step.lower(*args)
        self.pending[key] = self._pool.submit(lowered.compile)
        self.seconds += time.perf_counter() - began

    def get(self, key: Hashable, step=None, *args):
        """The compiled program of `key`, compiled now from `step` and `args` if it was never submitted."""
        if key not in self.compiled:
            self.submit(key, step, *args)
            began = time.perf_counter()
            self.compiled[key] = self.pending.pop(key).result()
            self.seconds += time.perf_counter() - began
        return self.compiled[key]

    def close(self) -> None:
        """Drop what is not compiled yet (a compilation under way finishes on its thread)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

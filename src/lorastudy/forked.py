"""Calls side by side in forked processes, for the CPU stages after the GPU's (scoring, figures).

Forked, not spawned: a Snakemake script has no `__main__` guard for spawn to
re-import, and what the calls need is already in memory. The callers import
no machine-learning framework, so there are no threads to fork.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def forked_map(fn: Callable[..., Any], jobs: Sequence[tuple], processes: int, **kwargs: Any) -> list[Any]:
    """`[fn(*job, **kwargs) for job in jobs]`, up to `processes` at once in forked processes; results in order.

    With one process or one job, the calls run here. A call's error is raised here, after the calls before it.
    """
    if processes <= 1 or len(jobs) <= 1:
        return [fn(*job, **kwargs) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("fork")) as pool:
        done = [pool.submit(fn, *job, **kwargs) for job in jobs]
        return [future.result() for future in done]

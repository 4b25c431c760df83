"""XLA compilation: one persistent cache for every job of the study, and the time spent compiling.

The grid is many short jobs of a few program shapes, so compiling each shape
in every job would cost more than the training itself. JAX's persistent
compilation cache stores each compiled program on disk under a key of the
program and the device; a later job, on any node that sees the directory,
loads it instead of compiling again. Its size is bounded, which also turns on
JAX's file lock around every read and write of the cache, so that concurrent
jobs never see a half-written entry.

`CompileClock` reads JAX's own monitoring events, so a job can report how
much of its time was compilation (tracing, lowering, XLA compilation or
loading a cached program) and how much was steady-state work.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

# JAX's event names (jax._src.dispatch); their durations add up to the time a
# jitted function spends before it first runs at a new shape.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
BACKEND_COMPILE_EVENT = COMPILE_EVENTS[-1]


@dataclass(frozen=True)
class CacheSettings:
    """The `compilation_cache` section of the config (see the schema)."""

    dir: str | None = ".cache/jax"
    max_size_gb: float = 20.0
    min_compile_seconds: float = 0.0


def use_compilation_cache(settings: CacheSettings | dict | None) -> str | None:
    """Point JAX at the persistent cache; call before the job's first computation.

    `settings` is the config's `compilation_cache` section; None leaves JAX
    as it is. Returns the cache directory (absolute), or None when caching
    is off (`dir: null`).
    """
    import jax
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    if settings is None:
        return None
    s = settings if isinstance(settings, CacheSettings) else CacheSettings(**settings)
    if not s.dir:
        return None
    path = os.path.abspath(os.path.expanduser(s.dir))
    if jax.config.jax_compilation_cache_dir != path:
        # JAX opens its cache once, at the first compilation, and keeps that
        # directory: a worker whose earlier job, or whose environment
        # (JAX_COMPILATION_CACHE_DIR), opened another would write there.
        jax.config.update("jax_compilation_cache_dir", path)
        reset_cache()
    jax.config.update("jax_compilation_cache_max_size", int(s.max_size_gb * 2**30))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", s.min_compile_seconds)
    log.info("persistent XLA compilation cache: %s (at most %.0f GB)", path, s.max_size_gb)
    return path


class CompileClock:
    """Seconds JAX spent compiling, and how many programs came from the persistent cache.

    One listener per process, registered on first use; read `seconds`,
    `programs` and `cache_hits` before and after a region (or use `region`).

    Example:
        clock = CompileClock.get()
        with clock.region() as spent:
            train()
        spent.seconds, spent.programs, spent.cache_hits
    """

    _instance: CompileClock | None = None

    def __init__(self) -> None:
        import jax

        self.seconds = 0.0
        self.programs = 0
        self.cache_hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    @classmethod
    def get(cls) -> CompileClock:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.programs += event == BACKEND_COMPILE_EVENT

    def _on_event(self, event: str, **kwargs) -> None:
        self.cache_hits += event == CACHE_HIT_EVENT

    @contextlib.contextmanager
    def region(self) -> Iterator[Spent]:
        spent = Spent()
        start = (self.seconds, self.programs, self.cache_hits)
        try:
            yield spent
        finally:
            spent.seconds = self.seconds - start[0]
            spent.programs = self.programs - start[1]
            spent.cache_hits = self.cache_hits - start[2]


@dataclass
class Spent:
    """Compilation inside one region: seconds, programs compiled or loaded, of which from the cache."""

    seconds: float = 0.0
    programs: int = 0
    cache_hits: int = 0

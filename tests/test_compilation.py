"""The persistent compilation cache shared by jobs, and the compile clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A job in miniature: point JAX at the cache, compile one program, report.
JOB = """
import json, sys
import jax, jax.numpy as jnp
from lorastudy.compilation import CompileClock, use_compilation_cache
use_compilation_cache({"dir": sys.argv[1], "min_compile_seconds": 0})
clock = CompileClock.get()
with clock.region() as spent:
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
    y = f(jnp.arange(64.0 * 32).reshape(64, 32) / 1000)
print(json.dumps({"sum": float(y.sum()), "programs": spent.programs, "hits": spent.cache_hits, "seconds": spent.seconds}))
"""


def _start(cache):
    return subprocess.Popen([sys.executable, "-c", JOB, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_concurrent_jobs_share_the_cache_and_a_later_job_loads_from_it(tmp_path):
    cache = tmp_path / "cache"
    first = [_result(p) for p in [_start(cache), _start(cache)]]
    assert list(cache.glob("*-cache"))
    later = _result(_start(cache))
    assert later["hits"] >= 1 and later["programs"] >= later["hits"]
    assert {r["sum"] for r in [*first, later]} == {first[0]["sum"]}


def test_the_config_cache_wins_over_one_jax_opened_before(tmp_path):
    # A resident worker's environment may name a cache that JAX opened before the job's settings.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "environment"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    opened_first = "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(2))\n"
    process = subprocess.run([sys.executable, "-c", opened_first + JOB, str(tmp_path / "config")], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert list((tmp_path / "environment").glob("*-cache")), "the first program did not open the environment's cache"
    assert list((tmp_path / "config").glob("*-cache")), "the job's program went to the environment's cache, not the config's"


def test_no_settings_leave_jax_alone_and_a_null_dir_turns_the_cache_off():
    import jax

    from lorastudy.compilation import use_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    assert use_compilation_cache(None) is None and use_compilation_cache({"dir": None}) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_the_clock_counts_compilation_not_running():
    import jax
    import jax.numpy as jnp

    from lorastudy.compilation import CompileClock

    clock = CompileClock.get()
    f = jax.jit(lambda x: x * 2 + 1)
    x = jnp.ones(3)
    with clock.region() as first:
        f(x).block_until_ready()
    with clock.region() as again:
        f(x).block_until_ready()
    assert first.programs == 1 and first.seconds > 0
    assert again.programs == 0 and again.seconds == 0

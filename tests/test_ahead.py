"""Programs compiled ahead on threads give what the jitted function gives."""

from __future__ import annotations

import numpy as np
import pytest

from lorastudy.ahead import AheadPrograms


def test_programs_compiled_ahead_compute_what_the_jitted_step_does():
    import jax

    step = jax.jit(lambda x, w: jax.numpy.tanh(x @ w).sum(axis=-1))
    w = np.linspace(-1, 1, 64, dtype="float32").reshape(8, 8)
    programs = AheadPrograms(threads=2)
    for width in (4, 16):
        programs.submit(width, step, np.zeros((width, 8), "float32"), w)
    assert len(programs) == 2 and 16 in programs and 8 not in programs
    for width in (4, 16, 8):  # 8 was never submitted: compiled when asked for
        x = np.arange(width * 8, dtype="float32").reshape(width, 8) / 50
        np.testing.assert_array_equal(programs.get(width, step, x, w)(x, w), step(x, w))
    assert set(programs.compiled) == {4, 8, 16} and not programs.pending and programs.seconds > 0
    programs.close()


def test_a_step_that_cannot_trace_raises_when_submitted_and_leaves_nothing_pending():
    import jax

    programs = AheadPrograms(threads=1)
    step = jax.jit(lambda x: x.reshape(3, -1))  # 4 elements do not reshape to 3 rows
    with pytest.raises(TypeError):
        programs.submit("odd", step, np.zeros(4))
    assert "odd" not in programs
    programs.close()

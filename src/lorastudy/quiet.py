"""A quiet start: the notices the model libraries print on every start stay out of terminals and job logs.

Installed when lorastudy is imported, before any of those libraries is.
TensorFlow is imported only because KerasHub and Keras use it, when it is
installed, to tokenize; JAX does the study's computing. What is dropped is
the exact list in `NOISE`: any other line those libraries write still gets
through, so real warnings stay.

- TensorFlow 2.21 writes its oneDNN, CUDA-driver and CPU-feature notices
  before absl's logging is initialized, which ignores `TF_CPP_MIN_LOG_LEVEL`,
  so its import runs with file descriptor 2 filtered. The import also hides
  the GPUs from TensorFlow: JAX owns them, and a TensorFlow built with CUDA
  would otherwise reserve their memory at its first tokenizer call. (On a
  machine without a GPU, that device query is what prints the cuInit error.)
- TensorFlow Text's SentencePiece prints an INFO line for every Gemma
  tokenizer it builds: the model stage filters around those builds.
- JAX logs at INFO that it found no TPU; rouge-score's absl logs at INFO
  which tokenizer it uses. Their loggers are set to WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

from lorastudy import imports

NOISE = (
    b"All log messages before absl::InitializeLog() is called",
    b"oneDNN custom operations are on",
    b"Could not find cuda drivers on your machine",
    b"This TensorFlow binary is optimized to use available CPU instructions",
    b"To enable the following instructions:",
    b"failed call to cuInit",
    b"precompiled_charsmap is empty. use identity normalization.",
)
QUIET_LOGGERS = ("jax._src.xla_bridge", "absl")


@contextlib.contextmanager
def filtered_stderr(noise: tuple[bytes, ...] = NOISE) -> Iterator[None]:
    """Hold what is written to file descriptor 2, then pass on every line that is not noise.

    Lines come out after the block, whether it ends or raises: nothing but
    the listed notices is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held if not any(n in line for n in noise))
            if kept:
                os.write(2, kept)


@contextlib.contextmanager
def _quiet_tensorflow(module) -> Iterator[None]:
    """TensorFlow's import with its start-up notices filtered, and the GPUs hidden from it once imported."""
    with filtered_stderr():
        yield
        module.config.set_visible_devices([], "GPU")


def install() -> None:
    """Quiet the libraries that lorastudy imports later (idempotent)."""
    # After absl's initialization, TensorFlow and XLA honour this: INFO off, warnings on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    imports.install_around(("tensorflow",), _quiet_tensorflow)

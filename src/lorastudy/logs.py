"""Logging for rule scripts: everything a job says goes to its Snakemake log."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def logging_to(path: str | os.PathLike) -> Iterator[logging.Logger]:
    """Send logging, warnings, and the process's stdout and stderr to `path`.

    Keras prints its progress bar to stdout, and XLA and TensorFlow write to
    file descriptor 2 from C++; all of it belongs in the job's log. The
    descriptors themselves are redirected, so C-level output is caught too.
    An exception is logged with its traceback before it propagates, so the
    log alone explains a failed job.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    root = logging.getLogger()
    with open(path, "a", encoding="utf-8", buffering=1) as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield logging.getLogger("lorastudy")
        except BaseException:
            logging.getLogger("lorastudy").exception("job failed")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            logging.captureWarnings(False)
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)

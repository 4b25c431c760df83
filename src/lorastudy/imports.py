"""A quicker start: Keras and KerasHub import libraries this study never uses from them.

`import keras` imports matplotlib.pyplot (for `keras.visualization`) and
scikit-learn (for `keras.wrappers`) whenever they are installed, and
`import keras_hub` imports rouge-score, and through it NLTK and SciPy (for
`keras_hub.metrics`' ROUGE). Both guard those imports and carry on without
them. On the H200 machine they are about 3 s of the 6.4 s that importing
KerasHub takes, paid again by every job that loads a model.

So while Keras or KerasHub is being imported, `SKIPPED` count as missing;
afterwards they import as usual (the figures stage draws with matplotlib,
the score stage calls rouge-score itself). What a process that imported
lorastudy first gives up: `keras.visualization`, `keras.wrappers`' scikit-learn
estimators and KerasHub's ROUGE metrics, none of which the study uses.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

SKIPPED = ("matplotlib", "sklearn", "rouge_score")
IMPORTERS = ("keras", "keras_hub")


class _AroundLoader(importlib.abc.Loader):
    """Another loader, whose running of a module's code happens inside `around(module)`."""

    def __init__(self, loader: importlib.abc.Loader, around: Callable[[object], AbstractContextManager]):
        self.loader, self.around = loader, around

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with self.around(module):
            self.loader.exec_module(module)


class AroundImport(importlib.abc.MetaPathFinder):
    """Runs the import of the top-level packages `names` inside `around(module)`, a context manager.

    It finds nothing itself: it asks the other finders for the package's
    spec and wraps its loader. It stays installed: a probe
    (`importlib.util.find_spec`, as transformers makes) finds the spec
    without importing, and a later import still runs inside `around`.
    """

    def __init__(self, names: tuple[str, ...], around: Callable[[object], AbstractContextManager]):
        self.names, self.around, self.searching = names, around, False

    def find_spec(self, name, path, target=None):
        if name not in self.names or self.searching:
            return None
        self.searching = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _AroundLoader):
            spec.loader = _AroundLoader(spec.loader, self.around)
        return spec


def install_around(names: tuple[str, ...], around: Callable[[object], AbstractContextManager]) -> None:
    """Put an `AroundImport` first on the import path, once, unless one of `names` is imported already."""
    installed = any(isinstance(f, AroundImport) and f.around is around for f in sys.meta_path)
    if not installed and not any(name in sys.modules for name in names):
        sys.meta_path.insert(0, AroundImport(names, around))


class _SkipWhileImporting(importlib.abc.MetaPathFinder):
    """`SKIPPED` are missing while `depth` (the Keras and KerasHub imports under way) is above 0."""

    depth = 0

    def find_spec(self, name, path, target=None):
        if self.depth and name.partition(".")[0] in SKIPPED:
            raise ModuleNotFoundError(f"{name} is not imported while Keras is (lorastudy.imports)", name=name)
        return None


@contextlib.contextmanager
def _counted(module) -> Iterator[None]:
    _SkipWhileImporting.depth += 1
    try:
        yield
    finally:
        _SkipWhileImporting.depth -= 1


def install() -> None:
    """Skip `SKIPPED` in the Keras and KerasHub imports to come (idempotent; no effect once Keras is imported)."""
    if "keras" in sys.modules or any(isinstance(f, _SkipWhileImporting) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _SkipWhileImporting())
    install_around(IMPORTERS, _counted)

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

import importlib.abc
import importlib.util
import sys

SKIPPED = ("matplotlib", "sklearn", "rouge_score")
IMPORTERS = ("keras", "keras_hub")


class _TrackingLoader(importlib.abc.Loader):
    """Runs a package's import while `_SkipWhileImporting.depth` counts it."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        _SkipWhileImporting.depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            _SkipWhileImporting.depth -= 1


class _SkipWhileImporting(importlib.abc.MetaPathFinder):
    depth = 0
    searching = False

    def find_spec(self, name, path, target=None):
        if self.depth and name.partition(".")[0] in SKIPPED:
            raise ModuleNotFoundError(f"{name} is not imported while Keras is (lorastudy.imports)", name=name)
        if name not in IMPORTERS or self.searching:
            return None
        type(self).searching = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            type(self).searching = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _TrackingLoader):
            spec.loader = _TrackingLoader(spec.loader)
        return spec


def install() -> None:
    """Skip `SKIPPED` in the Keras and KerasHub imports to come (idempotent; no effect once Keras is imported)."""
    if "keras" not in sys.modules and not any(isinstance(f, _SkipWhileImporting) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipWhileImporting())

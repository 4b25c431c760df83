"""Per-epoch resume state of a finetune job, and the fingerprint that guards it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy.io import atomic_path, write_json
from lorastudy.lora import LoraSpec, save_adapter




class Checkpoints:
    """Per-epoch resume state in `<run dir>/checkpoints`, kept out of Snakemake's outputs.

    Snakemake deletes a job's declared outputs before it reruns the job, so
    the state that resuming needs lives beside them. Each file is written
    atomically; `state_epoch{e}.json` is written last and marks epoch e done.
    A fingerprint of the inputs and settings guards against resuming a run
    whose inputs have changed.
    """

    def __init__(self, directory: Path, fingerprint: str):
        self.dir, self.fingerprint = directory, fingerprint

    def adapter(self, epoch: int) -> Path:
        return self.dir / f"adapter_epoch{epoch}.lora.h5"

    def _optimizer(self, epoch: int) -> Path:
        return self.dir / f"optimizer_epoch{epoch}.npz"

    def _state(self, epoch: int) -> Path:
        return self.dir / f"state_epoch{epoch}.json"

    def latest(self, max_epoch: int) -> int:
        """The last epoch with complete, matching state (0 if none)."""
        for epoch in range(max_epoch, 0, -1):
            path = self._state(epoch)
            if path.is_file() and json.loads(path.read_text())["fingerprint"] == self.fingerprint:
                return epoch
        return 0

    def save(self, epoch: int, backbone, spec: LoraSpec, optimizer, state: dict[str, Any]) -> None:
        save_adapter(backbone, spec, self.adapter(epoch))
        with atomic_path(self._optimizer(epoch), suffix=".npz") as tmp:
            np.savez(tmp, *[np.asarray(v.numpy()) for v in optimizer.variables])
        write_json(self._state(epoch), {"fingerprint": self.fingerprint, "epoch": epoch, **state})
        for old in range(1, epoch):
            self._optimizer(old).unlink(missing_ok=True)

    def restore(self, epoch: int, backbone, model) -> dict[str, Any]:
        backbone.load_lora_weights(str(self.adapter(epoch)))
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)
        with np.load(self._optimizer(epoch)) as saved:
            for i, variable in enumerate(optimizer.variables):
                variable.assign(saved[f"arr_{i}"])
        return json.loads(self._state(epoch).read_text())

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class WaveCheckpoint:
    """Resume state of adapters trained side by side (`lorastudy.stacked`), after each epoch.

    Each run's adapter of each epoch (`adapter(name, epoch)`), the wave's
    stacked arrays (factors, optimizer state, which adapters live) and its
    bookkeeping, kept beside the runs' outputs as `Checkpoints` keeps a run's.
    Every file is written atomically, `state.json` last: it marks the epoch
    done, and its fingerprint guards against resuming changed work.
    """

    def __init__(self, directory: Path, fingerprint: str):
        self.dir, self.fingerprint, self.resumed_from = directory, fingerprint, 0

    def adapter(self, run: str, epoch: int) -> Path:
        return self.dir / run / f"adapter_epoch{epoch}.lora.h5"

    def save(self, epoch: int, arrays: Sequence[Any], state: dict[str, Any]) -> None:
        # The arrays of each epoch under a name of their own, so that a kill
        # between the two writes leaves state.json naming complete arrays.
        name = f"arrays_epoch{epoch}.npz"
        with atomic_path(self.dir / name, suffix=".npz") as tmp:
            np.savez(tmp, *[np.asarray(a) for a in arrays])
        write_json(self.dir / "state.json", {"fingerprint": self.fingerprint, "epoch": epoch, "arrays": name, **state})
        for old in range(1, epoch):
            (self.dir / f"arrays_epoch{old}.npz").unlink(missing_ok=True)

    def restore(self) -> tuple[int, list[np.ndarray], dict[str, Any]] | None:
        """(epoch, arrays, state) of the last finished epoch, or None if there is none for this fingerprint."""
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state["fingerprint"] != self.fingerprint:
            return None
        with np.load(self.dir / state["arrays"]) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        self.resumed_from = state["epoch"]
        return state["epoch"], arrays, state


def fingerprint(*parts: Any, files: Sequence[str | os.PathLike] = ()) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()

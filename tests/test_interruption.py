"""A finetune job killed after its first epoch resumes from it; reruns are exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dolly_like import SMOKE_DATA
from workflow_helpers import REPO, SNAKEFILE, snakemake, write_config

pytestmark = pytest.mark.slow

EPOCHS = 6
RUN_DIR = "results/finetune/tiny/32_r2_s0"
# The file that marks epoch 1 done: a grouped job's wave state (its one run here), or a per-run job's.
EPOCH_ONE_DONE = {
    "grouped": "results/finetune/tiny/32_checkpoints/32_r2_s0/state.json",
    "per_run": f"{RUN_DIR}/checkpoints/state_epoch1.json",
}


def long_run_config(tmp_path: Path, jobs: str = "grouped") -> Path:
    """The smoke config, one run, enough epochs that a kill after the first lands mid-run."""
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["grid"].update(subsets=["32"], ranks=[2], seeds=[0], epochs=list(range(1, EPOCHS + 1)))
    config["jobs"] = jobs
    return write_config(tmp_path / "long.yaml", config)


def start(workdir: Path, config: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--cores", "2", f"{RUN_DIR}/train.json", "--configfile", str(config)]
    env = {**os.environ, "LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)}
    log = open(workdir / "interrupted_run.log", "w")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def rerun(workdir: Path, config: Path) -> None:
    """What the README says to do after a crash: unlock (a SIGKILL leaves Snakemake's lock), rerun the incomplete."""
    env = {"LORASTUDY_DOLLY_JSONL": str(SMOKE_DATA)}
    snakemake(workdir, "--unlock", f"{RUN_DIR}/train.json", "--configfile", str(config), env=env)
    snakemake(workdir, "--cores", "2", "--rerun-incomplete", f"{RUN_DIR}/train.json", "--configfile", str(config), env=env)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the workflow ended before {path} appeared: see {process.args[6]}/interrupted_run.log"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize(("how", "jobs"), [("SIGTERM", "grouped"), ("SIGKILL", "grouped"), ("SIGKILL", "per_run")])
def test_killed_finetune_resumes_after_the_last_saved_epoch(tmp_path, how, jobs):
    config = long_run_config(tmp_path, jobs)
    run_dir = tmp_path / RUN_DIR
    process = start(tmp_path, config)
    wait_for(tmp_path / EPOCH_ONE_DONE[jobs], process)
    if how == "SIGTERM":
        # What SLURM sends at a time limit, to every process of the job.
        os.killpg(process.pid, signal.SIGTERM)
    else:
        # A node lost or the OOM killer: every process at once, no clean-up.
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=120)
    assert not (run_dir / "train.json").exists()
    assert not (run_dir / f"adapter_epoch{EPOCHS}.lora.h5").exists()
    for adapter in run_dir.glob("adapter_epoch*.lora.h5"):
        # Whatever is visible under a final name is complete (written under a temporary name, then renamed).
        assert adapter.stat().st_size > 0
        import h5py

        with h5py.File(adapter, "r"):
            pass

    rerun(tmp_path, config)
    stats = json.loads((run_dir / "train.json").read_text())
    assert stats["resumed_from_epoch"] >= 1
    assert stats["epochs_trained_this_run"] == EPOCHS - stats["resumed_from_epoch"] < EPOCHS
    assert _epoch_rows(run_dir / "history.csv") == list(range(1, EPOCHS + 1))
    assert all((run_dir / f"adapter_epoch{e}.lora.h5").is_file() for e in range(1, EPOCHS + 1))


def _epoch_rows(history: Path) -> list[int]:
    import csv

    return [int(r["epoch"]) for r in csv.DictReader(open(history)) if r["kind"] == "epoch"]


@pytest.mark.parametrize("jobs", ["grouped", "per_run"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, jobs):
    """Resuming restores the adapter, the optimizer and the data order: the same adapters as a run never stopped."""
    import h5py
    import numpy as np

    config = long_run_config(tmp_path, jobs)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir()
    whole.mkdir()
    process = start(killed, config)
    wait_for(killed / EPOCH_ONE_DONE[jobs], process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=120)
    for workdir in (killed, whole):
        rerun(workdir, config)

    def weights(path: Path) -> dict[str, np.ndarray]:
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return found

    a = weights(killed / RUN_DIR / f"adapter_epoch{EPOCHS}.lora.h5")
    b = weights(whole / RUN_DIR / f"adapter_epoch{EPOCHS}.lora.h5")
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

"""The GPU slot allocator: one set of GPUs per job on a shared machine.

The tests stand in a two-GPU machine with `CUDA_VISIBLE_DEVICES=0,1` (the
allocator only reads it and the lock files; no GPU is touched).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from lorastudy import gpus

HOLD = """
import json, os, sys, time
from lorastudy.gpus import claimed_gpus
count, hold, record = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with claimed_gpus(count, poll_seconds=0.05) as claimed:
    start = time.time()
    print("claimed", flush=True)
    time.sleep(hold)
    with open(record, "a") as f:
        f.write(json.dumps({"gpus": claimed, "visible": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()}) + "\\n")
"""


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv(gpus.SLOTS_DIR_ENV, str(tmp_path / "slots"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    # Other tests have started JAX in this process; the guard against that has a test of its own.
    monkeypatch.setattr(gpus, "_refuse_if_devices_in_use", lambda: None)
    return tmp_path


def _job(count: int, hold: float, record) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(count), str(hold), str(record)], stdout=subprocess.PIPE, text=True)


def test_concurrent_jobs_never_share_a_gpu(two_gpus):
    record = two_gpus / "claims.jsonl"
    jobs = [_job(1, 0.5, record) for _ in range(5)] + [_job(2, 0.3, record)]
    assert [job.wait(timeout=60) for job in jobs] == [0] * 6
    claims = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(claims) == 6
    for c in claims:
        assert c["visible"] == ",".join(c["gpus"])
    for i, a in enumerate(claims):
        for b in claims[i + 1 :]:
            if set(a["gpus"]) & set(b["gpus"]):
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


def test_a_killed_job_frees_its_gpus(two_gpus):
    job = _job(2, 3600, two_gpus / "claims.jsonl")
    assert job.stdout.readline().strip() == "claimed"
    with pytest.raises(gpus.GpuError, match="no 1 free GPUs"):
        with gpus.claimed_gpus(1, poll_seconds=0.05, timeout_seconds=0.5):
            pass
    job.send_signal(signal.SIGKILL)
    job.wait()
    with gpus.claimed_gpus(2, timeout_seconds=5) as claimed:
        assert claimed == ["0", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_pins_the_job_to_its_gpu_and_restores_the_environment(two_gpus):
    holder = _job(1, 3600, two_gpus / "claims.jsonl")
    assert holder.stdout.readline().strip() == "claimed"
    try:
        with gpus.claimed_gpus(1, timeout_seconds=5) as claimed:
            assert claimed == ["1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        holder.kill()
        holder.wait()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_more_gpus_than_the_machine_has_is_a_clear_error(two_gpus):
    with pytest.raises(gpus.GpuError, match="asks for 3 GPUs but this machine has 2"):
        with gpus.claimed_gpus(3):
            pass


def test_slurm_assignment_is_used_unchanged(two_gpus, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    with gpus.claimed_gpus(2) as claimed:
        assert claimed == ["0", "1"]
    assert not (two_gpus / "slots").exists()


def test_no_gpus_or_none_asked_changes_nothing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with gpus.claimed_gpus(1) as claimed:
        assert claimed == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with gpus.claimed_gpus(0) as claimed:
        assert claimed == []


def test_claiming_after_jax_started_its_devices_is_refused(tmp_path):
    code = "import jax; jax.devices(); from lorastudy.gpus import claimed_gpus\nwith claimed_gpus(1): pass"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", gpus.SLOTS_DIR_ENV: str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "claim GPUs before the first JAX computation" in done.stderr


def test_cli_counts_the_gpus_for_snakemake(monkeypatch, capsys):
    from lorastudy.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    main(["gpus"])
    assert capsys.readouterr().out.strip() == "3"

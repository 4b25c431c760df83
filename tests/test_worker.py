"""Model jobs of one Snakemake run share a resident worker, and each still behaves as its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from workflow_helpers import REPO

# Each job calls `run_job` as a rule script does; its output file holds the call's value.
SNAKEFILE = textwrap.dedent(
    """
    CALL = (
        "{python} -c 'import sys, json; from lorastudy.worker import run_job; "
        "print(run_job(sys.argv[1], log=sys.argv[2], resident=sys.argv[3] == \\"1\\", **json.loads(sys.argv[4])))' "
        "{{params.target}} {{log}} {{params.resident}} '{{params.kwargs}}' > {{output}}"
    )

    rule all:
        input: expand("pid_{{n}}.txt", n=[1, 2, 3]), "alone.txt"

    rule pid:
        output: "pid_{{n}}.txt"
        log: "logs/pid_{{n}}.log"
        params: target="os.getpid", resident="1", kwargs="{{}}"
        shell: CALL

    rule alone:
        input: expand("pid_{{n}}.txt", n=[1, 2, 3])
        output: "alone.txt"
        log: "logs/alone.log"
        params: target="os.getpid", resident="0", kwargs="{{}}"
        shell: CALL

    rule fails:
        output: "failed.txt"
        log: "logs/fails.log"
        params: target="lorastudy.io.read_jsonl", resident="1", kwargs='{{"path": "missing.jsonl"}}'
        shell: CALL

    rule sleeps:
        output: "slept.txt"
        log: "logs/sleeps.log"
        params: target="subprocess.run", resident="1", kwargs='{{"args": ["sleep", "60"]}}'
        shell: CALL
    """
).format(python=sys.executable)


@pytest.fixture
def workflow(tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    # Not under tmp_path: a socket's path must fit AF_UNIX's 107 bytes, or the jobs run in their own
    # processes (run_job), and pytest-xdist's basetemp (.../popen-gw0/test_...) is long enough to pass that.
    with tempfile.TemporaryDirectory(prefix="workers") as workers:
        yield tmp_path, {**os.environ, "PYTHONPATH": str(REPO / "src"), "LORASTUDY_WORKERS_DIR": workers}


def snakemake(workdir: Path, env: dict, *targets: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *targets], cwd=workdir, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 or not check, done.stderr
    return done


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_jobs_of_a_run_share_one_worker_that_ends_with_the_run(workflow):
    workdir, env = workflow
    snakemake(workdir, env)
    pids = {int((workdir / f"pid_{n}.txt").read_text()) for n in (1, 2, 3)}
    alone = int((workdir / "alone.txt").read_text())
    assert len(pids) == 1 and alone not in pids and alone != os.getpid()
    (worker,) = pids
    assert f"running in worker {worker}" in (workdir / "logs" / "pid_2.log").read_text()
    assert gone_within(worker, 5), "the worker outlived its Snakemake run"
    workers = Path(env["LORASTUDY_WORKERS_DIR"])
    assert not list(workers.glob("*.sock"))
    # A finished run's lock files go when the next run starts a worker.
    left = workers / "1-0123456789ab-0.busy"  # pid 1 never ends: kept
    finished = workers / f"{worker}-0123456789ab-0.busy"
    left.touch(), finished.touch()
    snakemake(workdir, env, "--forcerun", "pid", "pid_1.txt")
    assert left.exists() and not finished.exists()


def test_a_failed_job_fails_with_its_own_error_and_the_worker_stays(workflow):
    workdir, env = workflow
    done = snakemake(workdir, env, "--keep-going", "failed.txt", "pid_1.txt", check=False)
    assert done.returncode != 0 and not (workdir / "failed.txt").exists()
    log = (workdir / "logs" / "fails.log").read_text()
    assert "missing.jsonl" in log and "FileNotFoundError" in log
    assert (workdir / "pid_1.txt").read_text().strip().isdigit()


def test_killing_the_job_ends_its_worker(workflow):
    workdir, env = workflow
    run = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", "slept.txt"], cwd=workdir, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = workdir / "logs" / "sleeps.log"
    deadline = time.monotonic() + 60
    while "running in worker" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    worker = int(log.read_text().split("running in worker ")[1].split()[0])
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert gone_within(worker, 5), "the worker went on with a killed job"
    assert not (Path(env["LORASTUDY_WORKERS_DIR"]) / f"worker-{worker}.log").exists(), "it had nothing to say, and its file stays"


GPU_SNAKEFILE = textwrap.dedent(
    """
    CALL = (
        "{python} -c 'import sys; from lorastudy.worker import run_job; "
        "print(run_job(\\"os.getpid\\", log=sys.argv[1], gpus=int(sys.argv[2])))' {{log}} {{resources.gpu}} > {{output}}"
    )

    rule all:
        input: "d.txt"

    rule a:
        output: "a.txt"
        log: "logs/a.log"
        resources: gpu=1
        shell: CALL

    rule b:
        input: "a.txt"
        output: "b.txt"
        log: "logs/b.log"
        resources: gpu=2
        shell: CALL

    rule c:
        input: "b.txt"
        output: "c.txt"
        log: "logs/c.log"
        resources: gpu=1
        shell: CALL

    rule d:
        input: "c.txt"
        output: "d.txt"
        log: "logs/d.log"
        resources: gpu=1
        shell: CALL
    """
).format(python=sys.executable)


def test_a_job_on_more_gpus_stops_the_idle_worker_that_holds_them(workflow):
    """Two pretend GPUs (the slots are lock files): 1 GPU, then 2, then 1 and 1 again."""
    workdir, env = workflow
    (workdir / "Snakefile").write_text(GPU_SNAKEFILE)
    env = {**env, "CUDA_VISIBLE_DEVICES": "0,1", "LORASTUDY_GPU_SLOTS_DIR": str(workdir / "slots")}
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--resources", "gpu=2"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    a, b, c, d = (int((workdir / f"{job}.txt").read_text()) for job in "abcd")
    assert len({a, b, c}) == 3 and c == d, "a worker is kept for its GPU count and reused only for it"
    assert "claimed GPU 0,1" in (workdir / "logs" / "b.log").read_text()
    assert all(gone_within(pid, 5) for pid in (a, b, c))


def test_the_job_error_comes_back_as_itself_or_else_as_its_text():
    import pickle

    from lorastudy.worker import WorkerError, _error

    error = _error(pickle.dumps(FileNotFoundError(2, "No such file", "x.jsonl")), "FileNotFoundError: ...")
    assert isinstance(error, FileNotFoundError) and error.filename == "x.jsonl"
    fallback = _error(b"not a pickle", "KeyError: 'rank' (the traceback is in logs/a.log)")
    assert isinstance(fallback, WorkerError) and "logs/a.log" in str(fallback)


def test_a_socket_path_too_long_for_af_unix_runs_the_job_here_and_says_so(tmp_path, monkeypatch):
    from lorastudy import worker

    monkeypatch.setattr(worker, "snakemake_process", os.getppid)  # as if under Snakemake
    monkeypatch.setenv(worker.DIR_ENV, str(tmp_path / ("d" * worker.SOCKET_PATH_BYTES)))
    log = tmp_path / "job.log"
    assert worker.run_job("os.getpid", log=str(log)) == os.getpid()
    assert f"set {worker.DIR_ENV} to a shorter directory" in log.read_text()

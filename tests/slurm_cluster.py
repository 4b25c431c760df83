"""A real single-node SLURM on this machine, for tests: munge, slurmctld and slurmd, started and stopped by PID.

Debian's slurm-wlm and munge (installed by .ci/run). No cgroups (process
tracking through /proc), no accounting database: job states come from
squeue, kept for an hour after a job ends (MinJobAge). The node has two
GPUs as a generic resource that SLURM allocates, records and numbers
(CUDA_VISIBLE_DEVICES) like real ones. No GPU needs to exist: SLURM 22.05
drops a GPU without a device file ("Removing file-less GPU"), so
/dev/null and /dev/zero stand in as the files; without cgroups nothing is
done with them but numbering.

The config goes where SLURM's commands look by default, /etc/slurm/slurm.conf:
inside a job, Snakemake's SLURM executor drops every SLURM_* variable
(SLURM_CONF with them) before it calls srun. The file is written only where
none exists, marked as this test's, and removed afterwards.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = SYSTEM_CONF.with_name("gres.conf")
GPU_FILES = ("/dev/null", "/dev/zero")
MARK = "# Written by lorastudy's tests/slurm_cluster.py; removed when the test ends.\n"


def available() -> bool:
    return all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS)


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int, munge_socket: Path) -> str:
    return f"""\
ClusterName=lorastudy-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={getpass.getuser()}
SlurmdUser={getpass.getuser()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
NodeName={host} CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{len(GPU_FILES)} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def single_node_slurm(root: Path):
    """Start munge and SLURM under `root`; yield the environment that reaches them; stop them."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    for path in (SYSTEM_CONF, GRES_CONF):
        if path.exists() and not path.read_text().startswith(MARK):
            raise RuntimeError(f"{path} exists: this machine has a SLURM of its own, which the test leaves alone")
    conf = SYSTEM_CONF
    env = {**os.environ, "SLURM_CONF": str(conf)}
    processes = []
    try:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(MARK + slurm_conf(root, host, os.cpu_count(), memory_mb, munge_socket))
        GRES_CONF.write_text(MARK + "".join(f"NodeName={host} Name=gpu File={f}\n" for f in GPU_FILES))
        processes.append(_start(root, "munged", [
            "-F", "--force", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/seed",
        ], env))
        _wait(lambda: munge_socket.exists(), "munged's socket", root)
        processes.append(_start(root, "slurmctld", ["-D", "-i", "-f", str(conf)], env))
        processes.append(_start(root, "slurmd", ["-D", "-f", str(conf)], env))
        _wait(lambda: _node_state(env) in {"idle", "mixed", "allocated"}, "an idle SLURM node", root)
        yield env
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for path in (conf, GRES_CONF):
            if path.exists() and path.read_text().startswith(MARK):
                path.unlink()


def _start(root: Path, daemon: str, args: list[str], env: dict) -> subprocess.Popen:
    out = open(root / f"{daemon}.out", "w")
    return subprocess.Popen([_binary(daemon), *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def _node_state(env: dict) -> str:
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    return result.stdout.strip().rstrip("*~#")


def _wait(ready, what: str, root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")) + sorted(root.glob("*.out")))
            raise RuntimeError(f"no {what} after {timeout:.0f} s; SLURM logs under {root}:\n{logs}")
        time.sleep(0.5)

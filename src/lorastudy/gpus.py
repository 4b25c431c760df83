"""Which GPUs a job may use: one set of devices per job, on a workstation or a node.

Snakemake's `--resources gpu=N` caps how many GPUs the running jobs ask for,
but assigns none: every JAX process would see every GPU and preallocate most
of each one's memory. On one machine, a job therefore claims its GPUs from a
pool of slots, one lock file per GPU, and is pinned to them through
`CUDA_VISIBLE_DEVICES` before JAX starts. `fcntl` locks are held by the
process: a job that ends, fails or is killed frees its GPUs with it, and a
slot file left behind is no claim.

Under SLURM the scheduler has already assigned the job its GPUs (and set
`CUDA_VISIBLE_DEVICES`); its choice is used unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from lorastudy.internals import jax_started

log = logging.getLogger(__name__)

SLOTS_DIR_ENV = "LORASTUDY_GPU_SLOTS_DIR"
# The slot locks' descriptors of the claims now held, innermost last (lorastudy.worker hands them on).
_HELD: list[list[int]] = []


class GpuError(RuntimeError):
    """A job asks for GPUs that the machine cannot give."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use: `CUDA_VISIBLE_DEVICES` if set, else every NVIDIA GPU present."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d for d in (d.strip() for d in given.split(",")) if d and d != "-1"]
    # The driver lists one directory per GPU; reading it starts no CUDA context.
    listed = Path("/proc/driver/nvidia/gpus")
    if listed.is_dir():
        return [str(i) for i in range(len(list(listed.iterdir())))]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def slots_dir() -> Path:
    """One directory per machine, shared by every workflow of every user that runs there."""
    return Path(os.environ.get(SLOTS_DIR_ENV) or Path(tempfile.gettempdir()) / "lorastudy-gpu-slots")


def _open_slot(directory: Path, device: str) -> int:
    fd = os.open(directory / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # another user's jobs must be able to lock it too
    return fd


def _try_claim(directory: Path, devices: list[str], count: int) -> tuple[list[str], list[int]]:
    claimed, fds = [], []
    for device in devices:
        fd = _open_slot(directory, device)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        claimed.append(device)
        fds.append(fd)
        if len(claimed) == count:
            return claimed, fds
    for fd in fds:
        os.close(fd)
    return [], []


@contextlib.contextmanager
def claimed_gpus(count: int, poll_seconds: float = 2.0, timeout_seconds: float | None = None) -> Iterator[list[str]]:
    """Claim `count` GPUs of this machine for the `with` block and pin the process to them.

    Sets `CUDA_VISIBLE_DEVICES` to the claimed devices, so it must run before
    JAX first touches a device. With `count` 0, on a machine without GPUs, or
    in a SLURM job given exactly `count` GPUs, changes nothing. Waits while other jobs hold the
    slots (Snakemake's `--resources gpu=N` normally leaves some free).
    """
    devices = visible_gpus()
    if count <= 0 or not devices:
        yield []
        return
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job and len(devices) == count:
        log.info("GPUs as SLURM assigned them: CUDA_VISIBLE_DEVICES=%s", os.environ.get("CUDA_VISIBLE_DEVICES"))
        yield devices
        return
    if count > len(devices):
        raise GpuError(
            f"the job asks for {count} GPUs but this machine has {len(devices)} ({','.join(devices)}); "
            "lower resources.<rule>.gpu (or the model's) in the config"
        )
    _refuse_if_devices_in_use()
    # Inside a SLURM allocation (Snakemake run in `salloc`) the allocation's
    # GPUs are numbered from 0 whatever their physical numbers: its own pool.
    directory = slots_dir() / f"slurm-{slurm_job}" if slurm_job else slots_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        directory.chmod(0o1777)
    started = time.monotonic()
    waited = False
    while True:
        claimed, fds = _try_claim(directory, devices, count)
        if claimed:
            break
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise GpuError(f"no {count} free GPUs of {','.join(devices)} within {timeout_seconds:.0f} s (slots in {directory})")
        if not waited:
            log.info("waiting for %d of GPUs %s, held by other jobs (slots in %s)", count, ",".join(devices), directory)
            waited = True
        time.sleep(poll_seconds)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    log.info("claimed GPU %s after %.1f s", ",".join(claimed), time.monotonic() - started)
    _HELD.append(fds)
    try:
        yield claimed
    finally:
        _HELD.remove(fds)
        for fd in fds:
            os.close(fd)
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def held_slot_fds() -> list[int]:
    """The slot locks' file descriptors of the innermost claim: a child process given them holds the GPUs too."""
    return list(_HELD[-1]) if _HELD else []


def _refuse_if_devices_in_use() -> None:
    # CUDA reads CUDA_VISIBLE_DEVICES once, when JAX first creates its GPU
    # client; pinning after that would be silently ignored.
    if jax_started():
        raise GpuError("JAX already started its devices: claim GPUs before the first JAX computation")

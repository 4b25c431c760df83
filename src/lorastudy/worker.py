"""Model jobs in one resident process per Snakemake run and GPU count.

A model job (prepare_model, finetune, generate) used to be a Python process
of its own: before any work it imported JAX, Keras and KerasHub (6-7 s on an
H200 host, about 3 s on this project's 2-core CPU) and started CUDA, the same
for every job. Now a job's script hands its call to a worker that paid this once: one
process per Snakemake run and GPU count, which runs one job at a time, each
with the job's own log, and stays for the next job.

- The job's process is still the job: it claims the GPUs (`lorastudy.gpus`),
  waits for the call, and raises its error. When the job is killed, its
  worker exits at once (a call cannot be stopped halfway otherwise), so an
  interrupted job leaves exactly what a killed process leaves.
- A worker keeps its GPUs' slot locks while it lives, so other runs' jobs
  wait for them as for any job. It exits when its Snakemake process does, or
  after `IDLE_SECONDS` without a job; a job that needs other GPUs stops the
  idle workers of its run first.
- Nothing of one job reaches the next but the imports and the CUDA context:
  Keras's session (layer names, seeds) and JAX's in-memory programs are
  cleared after each call, and the working directory is the job's. The
  persistent compilation cache carries over, as between processes. One
  thing more, by design: a grouped finetune job's base and traced steps,
  for the next finetune job of the same model and settings
  (`lorastudy.resident`); any other job drops them first.
- Only under Snakemake (a `snakemake` process above the script) and with the
  config's `resident_worker: true`, and not for a job that asks for no GPU on
  a machine that has some; otherwise the call runs in the script's own
  process, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import itertools
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from lorastudy import resident
from lorastudy.gpus import claimed_gpus, held_slot_fds, visible_gpus
from lorastudy.logs import logging_to

IDLE_SECONDS = 30.0
START_SECONDS = 120.0
DIR_ENV = "LORASTUDY_WORKERS_DIR"
SLOTS = 1000  # workers of one run and GPU count at most
SOCKET_PATH_BYTES = 107  # Linux's sun_path: 108 bytes with the closing NUL
# What a worker's imports and devices depend on: a job whose values differ gets another worker.
_ENV_PREFIXES = ("XLA_", "JAX_", "KERAS_", "TF_", "CUDA_", "NCCL_", "LORASTUDY_", "PYTHON", "LD_")


class WorkerError(RuntimeError):
    """The worker died during a job, or its error could not be sent back as itself."""


def run_job(target: str, *, log: str, gpus: int = 0, resident: bool = True, **kwargs: Any) -> Any:
    """Call `target` ("package.module.function") with `kwargs` as a model job, its output in `log`.

    In a resident worker of this Snakemake run when `resident` and Snakemake
    runs the job; here, as a job's own process, otherwise, and for a job that
    asks for no GPU on a machine that has some (its JAX would take every GPU,
    so it keeps that to itself). Returns the call's value; raises its error.
    """
    machine_gpus = visible_gpus()
    gpus = gpus if machine_gpus else 0  # without GPUs every job is alike, whatever it asked for
    leader = snakemake_process() if resident and (gpus > 0 or not machine_gpus) else None
    socket = _socket(leader, gpus, SLOTS - 1) if leader is not None else None
    too_long = socket is not None and len(os.fsencode(socket)) > SOCKET_PATH_BYTES
    if leader is None or too_long:
        with logging_to(log) as job_log, claimed_gpus(gpus):
            if too_long:
                job_log.warning("running in this job's own process, not a resident worker: the worker's socket path "
                                "%s is longer than AF_UNIX allows (%d bytes); set %s to a shorter directory",
                                socket, SOCKET_PATH_BYTES, DIR_ENV)
            return _resolve(target)(**kwargs)
    with logging_to(log) as job_log, _worker(leader, gpus) as (conn, pid):
        job_log.info("running in worker %d (its own output: %s)", pid, _log_of(pid))
        conn.send(("call", target, kwargs, os.path.abspath(log), os.getcwd()))
        try:
            status, payload = conn.recv()
        except (EOFError, OSError) as error:
            raise WorkerError(f"worker {pid} died during the job (its own output: {_log_of(pid)})") from error
    if status == "error":
        raise _error(*payload)
    return payload


def _error(pickled: bytes | None, text: str) -> BaseException:
    # The job's own exception where it unpickles, so a job fails alike in a worker and alone.
    try:
        return pickle.loads(pickled) if pickled is not None else WorkerError(text)
    except Exception:  # noqa: BLE001
        return WorkerError(text)


def snakemake_process() -> int | None:
    """The nearest `snakemake` process above this one (Linux's /proc), or None."""
    pid = os.getppid()
    while pid > 1:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        names = [os.path.basename(a) for a in args[:2]]
        if "snakemake" in names or args[1:3] == ["-m", "snakemake"]:
            return pid
        pid = parent
    return None


def _directory(create: bool = True) -> Path:
    path = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"lorastudy-workers-{os.getuid()}")
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _key(gpus: int) -> str:
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) and k != "CUDA_VISIBLE_DEVICES")
    return hashlib.sha256(repr((gpus, sys.executable, env)).encode()).hexdigest()[:12]


def _socket(leader: int, gpus: int, index: int) -> Path:
    return _directory() / f"{leader}-{_key(gpus)}-{index}.sock"


def _log_of(pid: int) -> Path:
    # Not made here: a worker exiting after its directory was removed must not make it again.
    return _directory(create=False) / f"worker-{pid}.log"


@contextlib.contextmanager
def _busy(path: Path) -> Iterator[bool]:
    """Whether the worker at `path` was free and is now ours (its `.busy` lock held for the block)."""
    fd = os.open(path.with_suffix(".busy"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _worker(leader: int, gpus: int) -> Iterator[tuple[Connection, int]]:
    """A free worker of this run for `gpus` GPUs, kept ours for the block; started (its GPUs claimed) if none is free."""
    for index in range(SLOTS):
        path = _socket(leader, gpus, index)
        with _busy(path) as free:
            if not free:
                continue
            found = _connect(path) if path.exists() else None
            if found is None:
                path.unlink(missing_ok=True)  # its worker is gone
                found = _start(path, leader, gpus)
            with found[0]:
                yield found
            return
    raise WorkerError(f"no free worker slot in {_directory()}")


def _connect(path: Path) -> tuple[Connection, int] | None:
    try:
        conn = Client(str(path), "AF_UNIX")
        conn.send(("hello",))
        return conn, conn.recv()
    except (OSError, EOFError):
        return None


def _start(path: Path, leader: int, gpus: int) -> tuple[Connection, int]:
    _sweep()
    if gpus > 0:
        _stop_idle(leader)  # they may hold the very GPUs this job needs
    # A short poll: the GPUs are this run's own idle workers' until they have exited.
    with claimed_gpus(gpus, poll_seconds=0.1), open(os.devnull) as devnull:
        # The worker inherits the slot locks' descriptors, so the GPUs stay claimed while it lives.
        slots = held_slot_fds()
        process = subprocess.Popen(
            [sys.executable, "-m", "lorastudy.worker", str(path), str(leader), *map(str, slots)],
            stdin=devnull, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=slots, start_new_session=True,
        )
    started = time.monotonic()
    # The socket file appears when the worker binds it, a moment before it listens: until then a connection is refused.
    while (found := _connect(path) if path.exists() else None) is None:
        if process.poll() is not None:
            raise WorkerError(f"worker {process.pid} exited with status {process.returncode} while starting ({_log_of(process.pid)})")
        if time.monotonic() - started > START_SECONDS:
            process.kill()
            raise WorkerError(f"worker {process.pid} did not start within {START_SECONDS:.0f} s ({_log_of(process.pid)})")
        time.sleep(0.02)
    return found


def _sweep() -> None:
    """Remove the lock files of finished runs (a worker that was stopped, killed or crashed leaves its own)."""
    for busy in _directory().glob("*-*-*.busy"):
        leader = busy.name.split("-", 1)[0]
        if leader.isdigit() and not _alive(int(leader)):
            busy.unlink(missing_ok=True)


def _stop_idle(leader: int) -> None:
    for path in _directory().glob(f"{leader}-*.sock"):
        with _busy(path) as free:
            if free:
                with contextlib.suppress(OSError, EOFError), Client(str(path), "AF_UNIX") as conn:
                    conn.send(("stop",))
                    pid = conn.recv()
                    while _alive(pid):
                        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A process that has exited but not been reaped (a zombie) is gone too.
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _resolve(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


# -- the worker's side ---------------------------------------------------------


def serve(path: Path, leader: int, idle_seconds: float = IDLE_SECONDS) -> None:
    """Answer jobs on the socket at `path` until `leader` exits or no job comes for `idle_seconds`."""
    resident.keep = True
    listener = Listener(str(path), "AF_UNIX")
    state = {"busy": False, "since": time.monotonic()}
    threading.Thread(target=_watch, args=(path, leader, state, idle_seconds), daemon=True).start()
    while True:
        with listener.accept() as conn:
            try:
                message = conn.recv()
                conn.send(os.getpid())
                if message[0] == "stop":
                    _exit(path, 0)
                message = conn.recv()
            except (EOFError, OSError):
                continue
            state["busy"] = True
            _, target, kwargs, log_path, cwd = message
            done = threading.Event()
            threading.Thread(target=_exit_when_gone, args=(conn, path, done), daemon=True).start()
            reply = _call(target, kwargs, log_path, cwd)
            done.set()
            try:
                conn.send(reply)
            except (OSError, pickle.PicklingError, TypeError, AttributeError):
                with contextlib.suppress(OSError):
                    conn.send(("ok", None))  # a value that does not pickle: the job's files are its result
            state.update(busy=False, since=time.monotonic())


def _call(target: str, kwargs: dict, log_path: str, cwd: str) -> tuple[str, Any]:
    os.chdir(cwd)
    if target != resident.USER:
        resident.release()
    try:
        with logging_to(log_path) as job_log:
            job_log.info("worker %d: job %d here; device memory in use before it: %s", os.getpid(), next(_JOBS), _in_use())
            return "ok", _resolve(target)(**kwargs)
    except BaseException as error:  # noqa: BLE001 - the job's error, whatever it is, belongs to the job
        text = f"{type(error).__name__}: {error} (the traceback is in {log_path})"
        try:
            return "error", (pickle.dumps(error), text)
        except Exception:  # noqa: BLE001
            return "error", (None, text)
    finally:
        _forget()


_JOBS = itertools.count(1)


def _in_use() -> str:
    """What the last job left on the device (it should be nothing): bytes held by live arrays."""
    if "jax" not in sys.modules:
        return "no device yet"
    stats = sys.modules["jax"].devices()[0].memory_stats() or {}
    return f"{stats['bytes_in_use'] / 2**30:.2f} GiB" if "bytes_in_use" in stats else "not reported"


def _forget() -> None:
    """Clear what a job leaves in the process: Keras's session and JAX's in-memory programs.

    Not while a grouped finetune job's base is held for the next job of its
    model (`lorastudy.resident`): its steps' traced programs are what is kept.
    """
    import gc

    if not resident.held():
        resident.forget_programs()
    gc.collect()


def _exit_when_gone(conn: Connection, path: Path, done: threading.Event) -> None:
    # The job's process sends nothing during a call: readable means it closed, i.e. it was killed.
    while not done.is_set():
        try:
            gone = conn.poll(0.5)
        except (OSError, ValueError):
            return
        if gone and not done.is_set():
            _exit(path, 3)


def _watch(path: Path, leader: int, state: dict, idle_seconds: float) -> None:
    while True:
        time.sleep(0.5)
        if not _alive(leader):
            path.with_suffix(".busy").unlink(missing_ok=True)  # the run is over: no job of it will ask
            _exit(path, 0)
        if not state["busy"] and time.monotonic() - state["since"] > idle_seconds:
            with _busy(path) as free:
                if free:
                    _exit(path, 0)


def _exit(path: Path, status: int) -> None:
    path.unlink(missing_ok=True)
    own = _log_of(os.getpid())
    # Its own output (outside jobs) is kept where it says something: a worker that did not end as planned.
    with contextlib.suppress(OSError):
        if status == 0 or own.stat().st_size == 0:
            own.unlink()
    os._exit(status)


def main() -> None:
    path, leader = Path(sys.argv[1]), int(sys.argv[2])
    for fd in map(int, sys.argv[3:]):
        os.set_inheritable(fd, False)  # the GPU claim is the worker's alone, not its compilers' or tools'
    with open(_log_of(os.getpid()), "a", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        serve(path, leader)


if __name__ == "__main__":
    main()

"""Writing files so that a crash never leaves half of one, and one process at a time per resource.

Every file another part of cxr reads back (checkpoints, result.json, decoded caches, features)
is written to a temporary sibling and moved into place with `os.replace`: a reader sees the old
file or the new one, never a mix, and a crash or a full disk mid-write leaves the old one intact.
Python-level signal handlers wait until the file is in place (see `signals_deferred`).
"""

import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then move it into place."""
    path = Path(path)
    # the pid keeps concurrent writers (sweep jobs, torchrun ranks) off each other's temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with signals_deferred(), open(tmp, "wb") as f:
            write(f)
            f.close()
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# the signals a job is asked to stop or checkpoint with (Ctrl-C, kill, SLURM/submitit's USR1/2)
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Python signal handlers back for the `with` block, then deliver what arrived.

    A Python handler runs between any two bytecodes, so one that raises (submitit's USR2 handler
    calls sys.exit, SIGINT raises KeyboardInterrupt) can land inside torch.save's write callback,
    where torch turns it into `RuntimeError: unexpected pos` and the job is recorded as failed
    instead of requeued. Deferred, the handler runs once the file is whole and in place.
    Handlers can only be swapped in the main thread; elsewhere they never run anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in DEFERRED_SIGNALS}
    for sig, handler in previous.items():
        if callable(handler):  # default and ignore dispositions act in C, not mid-bytecode
            signal.signal(sig, lambda signum, _frame: arrived.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if callable(handler):
                signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)


@contextmanager
def exclusive(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if needed) for the `with` block.

    Sweep jobs started together (joblib, per-GPU, torchrun ranks) would otherwise all build the
    same dataset or cache at once; with the lock the first builds it and the others wait, then
    find it complete. The lock goes with the process, so a killed job never leaves it held.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

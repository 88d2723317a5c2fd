"""Writing files so that a crash never leaves half of one, and one process at a time per resource.

Every file another part of cxr reads back (checkpoints, result.json, decoded caches, features)
is written to a temporary sibling and moved into place with `os.replace`: a reader sees the old
file or the new one, never a mix, and a crash or a full disk mid-write leaves the old one intact.
"""

import fcntl
import os
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
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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

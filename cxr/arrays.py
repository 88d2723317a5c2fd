"""Arrays cached on disk as .npy files, never whole in memory, checked before every use.

cxr's two caches are such arrays: the decoded images (cxr.decoding) and the frozen backbone's
features (cxr.features). `build` writes one into a temporary file a chunk of rows at a time, moves it
into place once it is whole and synced, then writes the JSON index that describes it; `open_checked`
maps it back (copy-on-write) only when it is exactly what its index says: the header's dtype and
shape, the file's size (nothing cut off or appended) and a crc32 of its rows.

A map's resident pages count in the process's memory (RSS) until it hands them back, so code that
reads a large map through calls `release` as it goes: the pages stay in the kernel's page cache (a
later read is a minor fault, not a disk read) and the process's memory stays flat whatever the
array's size.
"""

import ctypes
import errno
import io
import json
import logging
import math
import mmap
import os
import re
import shutil
import socket
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cxr.files import atomic_write, signals_deferred

log = logging.getLogger(__name__)

# rows held in memory at a time while an array is written, checked or copied to a device
CHUNK_BYTES = 16 << 20
# what a full disk or quota says (EFBIG: a file size limit)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# a temporary array file: .<name>.npy.<host>-<pid>.tmp (see `build`)
TMP_NAME = re.compile(r"\..+\.npy\.(?P<host>.+)-(?P<pid>\d+)\.tmp")


class DiskFull(OSError):
    """No room for an array: one line naming the folder, the bytes needed and the bytes free."""


def chunk_rows(shape: Sequence[int], itemsize: int) -> int:
    """Rows of an array of `shape` in one chunk of about CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // max(1, math.prod(shape[1:]) * itemsize))


def create(path: Path, dtype, shape: Sequence[int]) -> int:
    """A new .npy at `path` with room for `shape`, every block of it allocated; the offset of its
    first row.

    Written through memory maps, a file that is only sized (sparse) meets a full disk as SIGBUS:
    the process dies without a word and leaves the file behind. Allocated first, a full disk is
    DiskFull here, before any work. (`path` is removed by the caller, `build`.)
    """
    header = io.BytesIO()  # the header open_memmap writes (NumPy's own function)
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    needed = header.tell() + math.prod(shape) * np.dtype(dtype).itemsize
    try:
        offset = np.lib.format.open_memmap(path, "w+", dtype, tuple(shape)).offset
        if not hasattr(os, "posix_fallocate"):  # macOS: the free space is checked instead
            if shutil.disk_usage(path.parent).free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        else:
            with open(path, "rb+") as f:
                os.posix_fallocate(f.fileno(), 0, needed)
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        raise DiskFull(f"{path.parent}: {needed:,} bytes needed, {shutil.disk_usage(path.parent).free:,} free; "
                       "free some, or set data.cache_dir (or CXR_CACHE_DIR) to a larger disk") from None
    return offset


def remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary array files of this host's writers that are no longer running (killed
    mid-build, they can be as large as a whole split); another host's, on a shared disk, stay."""
    host = socket.gethostname()
    for path in folder.glob(".*.tmp"):
        match = TMP_NAME.fullmatch(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            log.info("removing %s, left by a writer that is no longer running", path)
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_rows(path: Path, offset: int, start: int, rows: Sequence[np.ndarray]) -> None:
    """Write `rows` (arrays of one shape and dtype) into rows start... of the .npy at `path`.

    Through a map of those rows alone: one map of the whole file would keep every page written so
    far resident in this process until it is unmapped, so a map per chunk keeps memory flat.
    """
    if len(rows) == 0:
        return
    first = rows[0]
    window = np.memmap(path, first.dtype, "r+", offset + start * first.nbytes, (len(rows), *first.shape))
    for i, row in enumerate(rows):  # row by row: np.stack of a list would hold a second copy
        window[i] = row
    window.flush()
    del window


def build(array_file: Path, index_file: Path, write: Callable[[Path], dict],
          sample_rows: int | None) -> tuple[np.memmap, dict]:
    """A new array: `write(tmp)` fills a temporary file and returns what the index says of it; the
    file is synced and moved into place, then the index (with the checksum) is written beside it.
    Returns the array, mapped, and its index.

    The old index goes before the new array moves in, and the new one comes last: an index on disk
    always describes the array beside it. `write` stays interruptible (an interrupt leaves only the
    temporary file, removed here); the move is not, like `atomic_write`'s.
    """
    # host and pid keep concurrent writers (other hosts sharing the cache dir) off each other's
    # file, and tell a dead writer's file (see remove_stale_tmp)
    tmp = array_file.with_name(f".{array_file.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        index = write(tmp)
        with signals_deferred():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            index_file.unlink(missing_ok=True)
            os.replace(tmp, array_file)
    finally:
        tmp.unlink(missing_ok=True)
    array = np.load(array_file, mmap_mode="c")
    index = {**index, "sample_crc32": checksum(array, sample_rows)}
    atomic_write(index_file, lambda f: f.write(json.dumps(index).encode()))
    return array, index


def checksum(array: np.ndarray, sample_rows: int | None) -> int:
    """crc32 of the array's rows: all of them (None), or `sample_rows` spread evenly over it (all
    when fewer), read a chunk at a time.

    Trade-off: a crc32 of every row catches any damage but reads the whole array; a sample costs a
    few MB. With the exact file size and the header's shape and dtype checked against the index, a
    sample still catches a truncated or extended file and an array of other rows, even one of the
    same shape (different images differ in the sampled rows). What it misses is damage confined to
    rows it does not read, which is the file system's to catch.
    """
    count = len(array)
    rows = np.arange(count) if sample_rows is None else np.unique(
        np.linspace(0, count - 1, min(count, sample_rows)).round().astype(np.int64))
    step = chunk_rows(array.shape, array.itemsize)
    crc = 0
    for start in range(0, len(rows), step):
        crc = zlib.crc32(np.ascontiguousarray(array[rows[start:start + step]]), crc)
        release(mapping_of(array))
    return crc


def open_checked(array_file: Path, dtype, shape: Sequence[int], crc: int, sample_rows: int | None) -> np.memmap | None:
    """The .npy at `array_file` mapped copy-on-write, or None unless it is exactly the array an index
    describes: the header's dtype and shape, a file size of header + rows, the checksum.

    allow_pickle stays off: a cache file cannot run code. Copy-on-write maps are writable, so
    torch.from_numpy takes them without a warning, and nothing written to them can reach the file.
    """
    try:
        array = np.load(array_file, mmap_mode="c")
    except (OSError, ValueError, EOFError, SyntaxError):  # unreadable, truncated, a damaged header
        return None
    whole = (array.dtype == np.dtype(dtype) and array.shape == tuple(shape)
             and array_file.stat().st_size == array.offset + array.nbytes)
    return array if whole and checksum(array, sample_rows) == crc else None


def mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The file map a mapped array (np.load's memmap) reads from; None for one in memory."""
    return array.base if isinstance(array.base, mmap.mmap) else None


# glibc's malloc_trim (None elsewhere: macOS's allocator returns large blocks by itself)
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release(mapping: mmap.mmap | None) -> None:
    """Hand back to the kernel what reading a large map through leaves resident in this process.

    The map's pages (none for None): MADV_DONTNEED on a file map that was never written to drops
    the process's references only; the pages stay in the page cache and read back unchanged. And
    the C heap's free pages: batches gathered from the map (tens of MB at 224 px) are freed between
    the small tensors kept from each (evaluation's probabilities and labels), which leaves holes the
    heap never reuses for the next batch: measured, evaluation's memory grew by one batch a batch.
    """
    if mapping is not None:
        mapping.madvise(mmap.MADV_DONTNEED)
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

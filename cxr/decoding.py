"""Decode images once, cache them as uint8 arrays: `Split`, `load_split`.

Decoding ~1,500 px JPEGs is what made the reference experiment slow, so every image is decoded
and resized exactly once (PIL's draft mode lets libjpeg downscale by 2/4/8 while decoding, spread
over the cores) into a uint8 array on disk, keyed by the file list, the labels, the image size and
the preprocessing. Runs and sweep jobs after the first read that array only.

The array is a .npy file written a chunk at a time as the images are decoded and read back as a
memory map, so neither building nor reading the cache holds the whole dataset in memory: a dataset
larger than RAM can be cached and trained on from the CPU (the kernel pages the images in and out).

Labels are int64: one class index per image (N,), or for multi-label data one value per finding
(N, K) with 1 present, 0 absent and -1 unknown (masked out of the loss and the metrics).
"""

import ctypes
import errno
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cxr.files import atomic_write, exclusive, signals_deferred

log = logging.getLogger(__name__)

# bump when decoding or the cache layout changes: old cache files are then never read again
CACHE_VERSION = 3  # 3: memory-mapped array, checked by size and a sampled checksum
PREPROCESSING = "gray-squash-bilinear-draft"
TASK_IMAGES = 16  # images per task sent to a decode worker: few round trips, a smooth progress bar
# decoded images held before they are written to the cache file: the build's memory is about twice
# this (the chunk, then its pages in the file map), whatever the number of images
CHUNK_BYTES = 16 << 20
SAMPLE_ROWS = 64  # images whose checksum ties the array to its index (see _sample_crc)


@dataclass
class Split:
    """One decoded split: uint8 images (N, 1, S, S), int64 labels (N,) or (N, K), file paths.

    From `load_split` the images are a copy-on-write map of the cache file: pages are read as
    batches touch them, and writes (none are made) would stay private to the process.
    """

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        # On the CPU this returns the map itself (no copy). A GPU gets the decoded set whole
        # (5,216 images at 224 px are 262 MB as uint8), so batches are sliced there with no host
        # copy in the step; a set larger than GPU memory would need batches paged in instead.
        return Split(self.images.to(device), self.labels.to(device), self.paths, self.skipped)


def decode_image(path: str, size: int) -> np.ndarray | None:
    """Grayscale uint8 (size, size), or None when the file is not a readable image."""
    try:
        with Image.open(path) as image:
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale, still at least size x size
            image.draft("L", (size, size))
            # Squashed to a square like the seed (Keras target_size): the whole chest stays in view.
            return np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _decode_task(paths: list[str], size: int) -> list[np.ndarray | None]:
    return [decode_image(path, size) for path in paths]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_parent(parent: int) -> None:
    """Decode worker initializer: the worker is killed when the process that started it dies.

    A killed parent (SIGKILL, the OOM killer, a full disk's SIGBUS) cannot shut its pool down,
    and its workers would wait for tasks for ever, holding the cache file (found minutes later).
    SIGKILL, not SIGTERM: a forked worker has the parent's Python signal handlers.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def decoded_images(paths: list[str], size: int, workers: int, desc: str) -> Iterator[np.ndarray | None]:
    """`decode_image` of each path, in order, over `workers` processes (0: every core).

    At most a few tasks per worker are in flight, so however many paths there are, only a few
    hundred decoded images wait in memory for the consumer (Executor.map would submit them all
    and keep every result the consumer has not reached yet).
    """
    workers = workers or os.cpu_count() or 1
    # disable=None: a bar only on a terminal (a log file gets _build_cache's one line instead)
    with tqdm(total=len(paths), desc=f"decode {desc}", unit="img", leave=False, disable=None) as progress:
        if workers == 1 or len(paths) < 64:
            for path in paths:
                yield decode_image(path, size)
                progress.update()
            return
        tasks = (paths[i:i + TASK_IMAGES] for i in range(0, len(paths), TASK_IMAGES))
        # fork: the children only run PIL and NumPy, and start in milliseconds
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_end_with_parent, initargs=(os.getpid(),)) as pool:
            pending = deque(pool.submit(_decode_task, task, size) for task in islice(tasks, 4 * workers))
            while pending:
                images = pending.popleft().result()
                pending.extend(pool.submit(_decode_task, task, size) for task in islice(tasks, 1))
                progress.update(len(images))
                yield from images


def cache_key(items: list[tuple[str, int]], size: int) -> str:
    listing = [(path, label, *_stat(path)) for path, label in items]
    payload = json.dumps([CACHE_VERSION, PREPROCESSING, size, listing])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def decode_split(items: list[tuple[str, int]], size: int, workers: int, desc: str) -> Split:
    """Decode every file into memory (in parallel), dropping unreadable ones into `skipped`.

    For a few files at a time (cxr.predict); whole training splits go through `load_split`.
    """
    arrays = list(decoded_images([path for path, _ in items], size, workers, desc))
    keep = [i for i, a in enumerate(arrays) if a is not None]
    skipped = [items[i][0] for i, a in enumerate(arrays) if a is None]
    images = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, size, size), np.uint8)
    labels = np.array([items[i][1] for i in keep], dtype=np.int64)
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels),
                 [items[i][0] for i in keep], skipped)


def load_split(items: list[tuple[str, int]], size: int, cache_dir: Path, workers: int, desc: str) -> Split:
    """The decoded split, mapped from the cache, decoding (and caching) it first when needed."""
    key = cache_key(items, size)
    array_file, index_file = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    # sweep jobs started together: the first decodes, the others wait and read its cache
    with exclusive(cache_dir / f".{key}.lock"):
        _remove_stale_tmp(cache_dir)
        if index_file.exists() and array_file.exists():
            cached = _read_cache(index_file, array_file, items, size)
            if cached is not None:
                return cached
            log.warning("cache %s is damaged or was written for other data or another cxr version; "
                        "rebuilding it", array_file)
        return _build_cache(items, size, workers, desc, array_file, index_file)


def _build_cache(items: list[tuple[str, int]], size: int, workers: int, desc: str,
                 array_file: Path, index_file: Path) -> Split:
    """Decode `items` into `array_file` and write its index; the split, mapped from the file."""
    # host and pid keep concurrent writers (other hosts sharing the cache dir) off each other's
    # file, and tell a dead writer's file (see _remove_stale_tmp)
    tmp = array_file.with_name(f".{array_file.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        started = time.perf_counter()
        kept, skipped = _write_images(tmp, items, size, workers, desc)
        log.info("decoded %d images of %s in %.1f s (%d unreadable), cached in %s", len(kept), desc,
                 time.perf_counter() - started, len(skipped), array_file)
        # Decoding above stays interruptible (an interrupt leaves only `tmp`, removed below); the
        # move into place is not, like atomic_write's. The old index goes first: an index on disk
        # always describes the array beside it, written last, once that array is whole and synced.
        with signals_deferred():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            index_file.unlink(missing_ok=True)
            os.replace(tmp, array_file)
    finally:
        tmp.unlink(missing_ok=True)
    images = np.load(array_file, mmap_mode="c")
    index = {"version": CACHE_VERSION, "size": size, "paths": [path for path, _ in kept],
             "labels": [_json_label(label) for _, label in kept], "skipped": skipped,
             "sample_crc32": _sample_crc(images)}
    atomic_write(index_file, lambda f: f.write(json.dumps(index).encode()))
    return _mapped_split(images, index)


def _write_images(tmp: Path, items: list[tuple[str, int]], size: int, workers: int,
                  desc: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Decode into a new .npy at `tmp`, a chunk at a time; the (path, label) kept, the paths skipped.

    The file is created with a slot for every item; readable images fill the slots in order, so
    when some are skipped the kept ones are already contiguous and the file is cut short.
    """
    offset = _reserved_npy(tmp, (len(items), size, size))
    rows = max(1, CHUNK_BYTES // (size * size))
    kept, skipped, chunk = [], [], []
    decoded = decoded_images([path for path, _ in items], size, workers, desc)
    for (path, label), image in zip(items, decoded, strict=True):
        if image is None:
            skipped.append(path)
            continue
        kept.append((path, label))
        chunk.append(image)
        if len(chunk) == rows:
            _write_rows(tmp, offset, len(kept) - len(chunk), chunk)
            chunk = []
    _write_rows(tmp, offset, len(kept) - len(chunk), chunk)
    if skipped:
        _shrink(tmp, offset, len(kept), size)
    return kept, skipped


# what a full disk or quota says (EFBIG: a file size limit)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# a decode cache's temporary file: .<key>.npy.<host>-<pid>.tmp (see _build_cache)
TMP_NAME = re.compile(r"\.[0-9a-f]+\.npy\.(?P<host>.+)-(?P<pid>\d+)\.tmp")


def _reserved_npy(tmp: Path, shape: tuple[int, ...]) -> int:
    """Create the .npy at `tmp` with every block of it allocated; the offset of its data.

    Written through memory maps, a file that is only sized (sparse) meets a full disk as SIGBUS:
    the process dies without a word and leaves the file behind. Allocated first, a full disk is
    an error here, before any decoding. (`tmp` is removed by the caller.)
    """
    from cxr.data.errors import DataError  # here: cxr.data imports this module

    header = io.BytesIO()  # the header open_memmap writes (NumPy's own function)
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    needed = header.tell() + math.prod(shape)
    try:
        offset = np.lib.format.open_memmap(tmp, "w+", np.uint8, shape).offset
        if not hasattr(os, "posix_fallocate"):  # macOS: the free space is checked instead
            if shutil.disk_usage(tmp.parent).free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        else:
            with open(tmp, "rb+") as f:
                os.posix_fallocate(f.fileno(), 0, needed)
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        raise DataError(f"no space for the decoded images in {tmp.parent}: {needed:,} bytes needed, "
                        f"{shutil.disk_usage(tmp.parent).free:,} free; free some, or set data.cache_dir "
                        "(or CXR_CACHE_DIR) to a larger disk") from None
    return offset


def _remove_stale_tmp(cache_dir: Path) -> None:
    """Remove the temporary cache files of this host's writers that are no longer running (killed
    mid-build, they can be as large as a whole split)."""
    host = socket.gethostname()
    for path in cache_dir.glob(".*.tmp"):
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


def _write_rows(file: Path, offset: int, start: int, images: list[np.ndarray]) -> None:
    """Write `images` into rows start... of the .npy through a map of those rows alone.

    One map of the whole file would keep every page written so far resident in this process
    (file pages count in its RSS until it unmaps them): a map per chunk keeps memory flat.
    """
    if not images:
        return
    size = images[0].shape[-1]
    window = np.memmap(file, np.uint8, "r+", offset + start * size * size, (len(images), size, size))
    for row, image in enumerate(images):  # row by row: np.stack would hold a second copy of the chunk
        window[row] = image
    window.flush()
    del window


def _shrink(file: Path, offset: int, rows: int, size: int) -> None:
    """Cut the .npy down to its first `rows` images: a new header of the same length, then truncate."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (rows, size, size)}
    with open(file, "rb+") as f:
        # NumPy pads the first axis of every header to 21 digits so that it can be rewritten in place
        np.lib.format.write_array_header_1_0(f, header)
        if f.tell() != offset:
            raise RuntimeError(f"the .npy header of {file} changed length; cannot shrink it in place")
        f.truncate(offset + rows * size * size)


def _sample_crc(images: np.ndarray) -> int:
    """crc32 of SAMPLE_ROWS images spread evenly over the array (all of them when fewer).

    Trade-off: a crc32 of the whole array would catch any damage, but it reads every byte on every
    run (for a cache larger than memory, a full disk pass before the first step). The sample costs
    a few MB. With the exact file size and the header's shape and dtype checked against the index,
    it still catches a truncated or extended file and an array of other images, even one of the
    same shape (different images differ in the sampled rows). What it misses is damage confined
    to rows it does not read (a bit flipped on disk), which is the file system's to catch.
    """
    rows = np.unique(np.linspace(0, len(images) - 1, min(len(images), SAMPLE_ROWS)).round().astype(np.int64))
    return zlib.crc32(np.ascontiguousarray(images[rows]))


def _mapped_split(images: np.ndarray, index: dict) -> Split:
    # mmap_mode="c" (copy-on-write) maps are writable, so torch.from_numpy takes them without the
    # read-only warning, and nothing written to the tensor can reach the file
    return Split(torch.from_numpy(images).unsqueeze(1), torch.tensor(index["labels"], dtype=torch.int64),
                 index["paths"], index["skipped"])


def _json_label(label: int | tuple[int, ...]) -> int | list[int]:
    """A label as the cache's JSON index holds it (a multi-label tuple reads back as a list)."""
    return np.asarray(label).tolist()


def _read_cache(index_file: Path, array_file: Path, items: list[tuple[str, int]],
                size: int) -> Split | None:
    """The cached split, mapped, or None when the pair is damaged or describes other files.

    The file's exact size (header + rows) and the sampled checksum tie the array to its index: a
    truncated array, or one from another split or run, even of the same shape, is never used in
    its place (see _sample_crc for what a sample can miss).
    """
    try:
        index = json.loads(index_file.read_text())
        # allow_pickle stays off: a cache file cannot run code; a truncated file fails to map
        images = np.load(array_file, mmap_mode="c")
        cached = dict(zip(index["paths"], index["labels"], strict=True))
        matches = (index["version"] == CACHE_VERSION and index["size"] == size
                   and images.dtype == np.uint8 and images.shape == (len(cached), size, size)
                   and array_file.stat().st_size == images.offset + images.nbytes
                   and index["sample_crc32"] == _sample_crc(images)
                   and sorted([*cached, *index["skipped"]]) == sorted(path for path, _ in items)
                   and cached.items() <= {path: _json_label(label) for path, label in items}.items())
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, truncated, not our layout
        return None
    return _mapped_split(images, index) if matches else None

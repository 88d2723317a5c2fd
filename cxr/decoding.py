"""Decode images once, cache them as uint8 arrays: `Split`, `load_split`.

Decoding ~1,500 px JPEGs is what made the reference experiment slow, so every image is decoded
and resized exactly once (PIL's draft mode lets libjpeg downscale large JPEGs by 2/4/8 while
decoding, see cxr.pixels.DRAFT_MARGIN; spread over the cores) into a uint8 array on disk, keyed
by the file list, the labels, the image size and the preprocessing (data.window included). Runs
and sweep jobs after the first read that array only. What a file's pixels mean (JPEG, 16-bit PNG,
DICOM) and which of its grey values become 0..255 is cxr.pixels'.

The array is a .npy file written a chunk at a time as the images are decoded and read back as a
memory map (cxr.arrays), so neither building nor reading the cache holds the whole dataset in
memory: a dataset larger than RAM can be cached and trained on from the CPU (the kernel pages the
images in and out).

Labels are int64: one class index per image (N,), or for multi-label data one value per finding
(N, K) with 1 present, 0 absent and -1 unknown (masked out of the loss and the metrics).
"""

import ctypes
import dataclasses
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import signal
import sys
import time
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

from cxr import arrays
from cxr.files import exclusive
from cxr.pixels import DEFAULT_WINDOW, Unreadable, read_picture

log = logging.getLogger(__name__)

# bump when decoding or the cache layout changes: old cache files are then never read again
CACHE_VERSION = 4  # 4: skipped files with their reasons, data.window in the key, JPEG drafts at 4x the size
PREPROCESSING = "gray-squash-bilinear-draft"
TASK_IMAGES = 16  # images per task sent to a decode worker: few round trips, a smooth progress bar
SAMPLE_ROWS = 64  # images whose checksum ties the array to its index (see arrays.checksum)


@dataclass
class Split:
    """One decoded split: uint8 images (N, 1, S, S), int64 labels (N,) or (N, K), file paths, and
    the files skipped with the reason each is not a usable image.

    From `load_split` the images are a copy-on-write map of the cache file (`mapping`): pages are
    read as batches touch them, and writes (none are made) would stay private to the process.
    cxr.features makes splits of backbone features (N, F) the same way.
    """

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it is not a usable image
    mapping: mmap.mmap | None = None  # the file map `images` read from (None: in memory)
    # where batches are used: the images' own device, or the GPU a split held on the host is for
    device: torch.device | None = None

    def __post_init__(self):
        self.device = self.images.device if self.device is None else torch.device(self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device, host: bool = False, dtype: torch.dtype | None = None) -> "Split":
        """The split for training on `device` (cxr.placement decides how, before anything is copied).

        Copied there whole (as `dtype`, default the images' own), a chunk at a time so that host
        memory stays flat; batches are then sliced there with no host copy in the step. With `host`
        it stays where it is (a file map pages in and out) and each batch is copied to `device` when
        it is sliced, through pinned memory and asynchronously (cxr.batches). On the CPU, and for
        images already on `device` as `dtype`, this is the split itself: no copy.
        """
        device = torch.device(device)
        there = self.images.device.type == device.type and device.index in (None, self.images.device.index)
        if host or (there and dtype in (None, self.images.dtype)):
            return dataclasses.replace(self, device=device)
        images = torch.empty(self.images.shape, dtype=dtype or self.images.dtype, device=device)
        rows = arrays.chunk_rows(self.images.shape, self.images.element_size())
        for start in range(0, len(images), rows):
            images[start:start + rows] = self.images[start:start + rows]
            arrays.release(self.mapping)
        return Split(images, self.labels.to(device), self.paths, self.skipped)


def decode_image(path: str, size: int, window: str = DEFAULT_WINDOW) -> np.ndarray | str:
    """Grayscale uint8 (size, size) under data.window, or why the file is not a usable image.

    Compressed DICOM without its decoder plugin raises cxr.pixels.DecoderMissing.
    """
    try:
        picture = read_picture(path, window, draft=size)
    except Unreadable as error:
        return str(error)
    # Squashed to a square like the seed (Keras target_size): the whole chest stays in view.
    return np.asarray(Image.fromarray(picture).resize((size, size), Image.BILINEAR))


def _decode_task(paths: list[str], size: int, window: str) -> list[np.ndarray | str]:
    return [decode_image(path, size, window) for path in paths]


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


def decoded_images(paths: list[str], size: int, workers: int, desc: str,
                   window: str = DEFAULT_WINDOW) -> Iterator[np.ndarray | str]:
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
                yield decode_image(path, size, window)
                progress.update()
            return
        tasks = (paths[i:i + TASK_IMAGES] for i in range(0, len(paths), TASK_IMAGES))
        # fork: the children only run PIL and NumPy, and start in milliseconds
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_end_with_parent, initargs=(os.getpid(),)) as pool:
            pending = deque(pool.submit(_decode_task, task, size, window) for task in islice(tasks, 4 * workers))
            while pending:
                images = pending.popleft().result()
                pending.extend(pool.submit(_decode_task, task, size, window) for task in islice(tasks, 1))
                progress.update(len(images))
                yield from images


def cache_key(items: list[tuple[str, int]], size: int, window: str = DEFAULT_WINDOW) -> str:
    listing = [(path, label, *_stat(path)) for path, label in items]
    payload = json.dumps([CACHE_VERSION, PREPROCESSING, size, window, listing])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def decode_split(items: list[tuple[str, int]], size: int, workers: int, desc: str,
                 window: str = DEFAULT_WINDOW) -> Split:
    """Decode every file into memory (in parallel), dropping unreadable ones into `skipped`.

    For a few files at a time (cxr.predict); whole training splits go through `load_split`.
    """
    decoded = list(decoded_images([path for path, _ in items], size, workers, desc, window))
    keep = [i for i, a in enumerate(decoded) if not isinstance(a, str)]
    skipped = {items[i][0]: a for i, a in enumerate(decoded) if isinstance(a, str)}
    images = np.stack([decoded[i] for i in keep]) if keep else np.zeros((0, size, size), np.uint8)
    labels = np.array([items[i][1] for i in keep], dtype=np.int64)
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels),
                 [items[i][0] for i in keep], skipped)


def load_split(items: list[tuple[str, int]], size: int, cache_dir: Path, workers: int, desc: str,
               window: str = DEFAULT_WINDOW) -> Split:
    """The decoded split, mapped from the cache, decoding (and caching) it first when needed."""
    key = cache_key(items, size, window)
    array_file, index_file = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    # sweep jobs started together: the first decodes, the others wait and read its cache
    with exclusive(cache_dir / f".{key}.lock"):
        arrays.remove_stale_tmp(cache_dir)
        if index_file.exists() and array_file.exists():
            cached = _read_cache(index_file, array_file, items, size, window)
            if cached is not None:
                return cached
            log.warning("cache %s is damaged or was written for other data or another cxr version; "
                        "rebuilding it", array_file)
        return _build_cache(items, size, window, workers, desc, array_file, index_file)


def _build_cache(items: list[tuple[str, int]], size: int, window: str, workers: int, desc: str,
                 array_file: Path, index_file: Path) -> Split:
    """Decode `items` into `array_file` and write its index; the split, mapped from the file."""

    def write(tmp: Path) -> dict:
        started = time.perf_counter()
        kept, skipped = _write_images(tmp, items, size, window, workers, desc)
        log.info("decoded %d images of %s in %.1f s (%d unreadable), cached in %s", len(kept), desc,
                 time.perf_counter() - started, len(skipped), array_file)
        return {"version": CACHE_VERSION, "size": size, "window": window, "paths": [path for path, _ in kept],
                "labels": [_json_label(label) for _, label in kept], "skipped": skipped}

    return _mapped_split(*arrays.build(array_file, index_file, write, SAMPLE_ROWS))


def _write_images(tmp: Path, items: list[tuple[str, int]], size: int, window: str, workers: int,
                  desc: str) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """Decode into a new .npy at `tmp`, a chunk at a time; the (path, label) kept, the paths skipped
    (with their reasons).

    The file is created with a slot for every item; readable images fill the slots in order, so
    when some are skipped the kept ones are already contiguous and the file is cut short. The
    build's memory is about twice a chunk (the chunk, then its pages in the file map), whatever the
    number of images.
    """
    from cxr.data.errors import DataError  # here: cxr.data imports this module

    try:
        offset = arrays.create(tmp, np.uint8, (len(items), size, size))
    except arrays.DiskFull as error:
        raise DataError(f"no space for the decoded images: {error}") from None
    rows = arrays.chunk_rows((len(items), size, size), 1)
    kept, skipped, chunk = [], {}, []
    decoded = decoded_images([path for path, _ in items], size, workers, desc, window)
    for (path, label), image in zip(items, decoded, strict=True):
        if isinstance(image, str):
            skipped[path] = image
            continue
        kept.append((path, label))
        chunk.append(image)
        if len(chunk) == rows:
            arrays.write_rows(tmp, offset, len(kept) - len(chunk), chunk)
            chunk = []
    arrays.write_rows(tmp, offset, len(kept) - len(chunk), chunk)
    if skipped:
        _shrink(tmp, offset, len(kept), size)
    return kept, skipped


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


def _mapped_split(images: np.ndarray, index: dict) -> Split:
    return Split(torch.from_numpy(images).unsqueeze(1), torch.tensor(index["labels"], dtype=torch.int64),
                 index["paths"], index["skipped"], mapping=arrays.mapping_of(images))


def _json_label(label: int | tuple[int, ...]) -> int | list[int]:
    """A label as the cache's JSON index holds it (a multi-label tuple reads back as a list)."""
    return np.asarray(label).tolist()


def _read_cache(index_file: Path, array_file: Path, items: list[tuple[str, int]],
                size: int, window: str) -> Split | None:
    """The cached split, mapped, or None when the pair is damaged or describes other files.

    The file's exact size (header + rows) and the sampled checksum tie the array to its index: a
    truncated array, or one from another split or run, even of the same shape, is never used in
    its place (see arrays.checksum for what a sample can miss).
    """
    try:
        index = json.loads(index_file.read_text())
        cached = dict(zip(index["paths"], index["labels"], strict=True))
        matches = (index["version"] == CACHE_VERSION and index["size"] == size and index["window"] == window
                   and sorted([*cached, *index["skipped"]]) == sorted(path for path, _ in items)
                   and cached.items() <= {path: _json_label(label) for path, label in items}.items())
        images = matches and arrays.open_checked(array_file, np.uint8, (len(cached), size, size),
                                                 index["sample_crc32"], SAMPLE_ROWS)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, truncated, not our layout
        return None
    return _mapped_split(images, index) if isinstance(images, np.ndarray) else None

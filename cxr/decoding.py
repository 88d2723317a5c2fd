"""Decode images once, cache them as uint8 arrays: `Split`, `load_split`.

Decoding ~1,500 px JPEGs is what made the reference experiment slow, so every image is decoded
and resized exactly once (PIL's draft mode lets libjpeg downscale by 2/4/8 while decoding, spread
over the cores) into a uint8 array on disk, keyed by the file list, the labels, the image size and
the preprocessing. Runs and sweep jobs after the first read that array only.

Labels are int64: one class index per image (N,), or for multi-label data one value per finding
(N, K) with 1 present, 0 absent and -1 unknown (masked out of the loss and the metrics).
"""

import hashlib
import json
import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cxr.files import atomic_write, exclusive

log = logging.getLogger(__name__)

# bump when decoding or the cache layout changes: old cache files are then never read again
CACHE_VERSION = 2
PREPROCESSING = "gray-squash-bilinear-draft"


@dataclass
class Split:
    """One split decoded into memory: uint8 images (N, 1, S, S), int64 labels (N,) or (N, K), file paths."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        # The decoded set is small (5,216 images at 224 px are 262 MB as uint8), so it lives on
        # the training device whole and batches are sliced there: no host copy in the step.
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


def _decode_star(args):
    return decode_image(*args)


def cache_key(items: list[tuple[str, int]], size: int) -> str:
    listing = [(path, label, *_stat(path)) for path, label in items]
    payload = json.dumps([CACHE_VERSION, PREPROCESSING, size, listing])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def decode_split(items: list[tuple[str, int]], size: int, workers: int, desc: str) -> Split:
    """Decode every file (in parallel), dropping unreadable ones into `skipped`."""
    jobs = [(path, size) for path, _ in items]
    workers = workers or os.cpu_count() or 1
    progress = dict(total=len(jobs), desc=f"decode {desc}", unit="img", leave=False)
    if workers > 1 and len(jobs) >= 64:
        # fork: the children only run PIL and NumPy, and start in milliseconds
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            arrays = list(tqdm(pool.map(_decode_star, jobs, chunksize=16), **progress))
    else:
        arrays = [decode_image(*job) for job in tqdm(jobs, **progress)]
    keep = [i for i, a in enumerate(arrays) if a is not None]
    skipped = [items[i][0] for i, a in enumerate(arrays) if a is None]
    images = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, size, size), np.uint8)
    labels = np.array([items[i][1] for i in keep], dtype=np.int64)
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels),
                 [items[i][0] for i in keep], skipped)


def load_split(items: list[tuple[str, int]], size: int, cache_dir: Path, workers: int, desc: str) -> Split:
    """The decoded split from the cache, decoding (and caching) it first when needed."""
    key = cache_key(items, size)
    array_file, index_file = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    # sweep jobs started together: the first decodes, the others wait and read its cache
    with exclusive(cache_dir / f".{key}.lock"):
        if index_file.exists() and array_file.exists():
            cached = _read_cache(index_file, array_file, items, size)
            if cached is not None:
                return cached
            log.warning("cache %s is damaged or was written for other data or another cxr version; "
                        "rebuilding it", array_file)
        split = decode_split(items, size, workers, desc)
        array = split.images.squeeze(1).numpy()
        # the array first, the index last: an index on disk means a complete array beside it
        atomic_write(array_file, lambda f: np.save(f, array))
        index = {"version": CACHE_VERSION, "size": size, "paths": split.paths,
                 "labels": split.labels.tolist(), "skipped": split.skipped, "crc32": zlib.crc32(array)}
        atomic_write(index_file, lambda f: f.write(json.dumps(index).encode()))
    return split


def _json_label(label: int | tuple[int, ...]) -> int | list[int]:
    """A label as the cache's JSON index holds it (a multi-label tuple reads back as a list)."""
    return list(label) if isinstance(label, tuple) else label


def _read_cache(index_file: Path, array_file: Path, items: list[tuple[str, int]],
                size: int) -> Split | None:
    """The cached split, or None when the pair is damaged or describes other files.

    The checksum ties the array to its index: an array from another split or run, even one of the
    same shape, is never used in its place.
    """
    try:
        index = json.loads(index_file.read_text())
        images = np.load(array_file)  # allow_pickle stays off: a cache file cannot run code
        cached = dict(zip(index["paths"], index["labels"], strict=True))
        matches = (index["version"] == CACHE_VERSION and index["size"] == size
                   and images.dtype == np.uint8 and images.shape == (len(cached), size, size)
                   and index["crc32"] == zlib.crc32(images)
                   and sorted([*cached, *index["skipped"]]) == sorted(path for path, _ in items)
                   and cached.items() <= {path: _json_label(label) for path, label in items}.items())
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, truncated, not our layout
        return None
    if not matches:
        return None
    return Split(torch.from_numpy(images).unsqueeze(1), torch.tensor(index["labels"]),
                 index["paths"], index["skipped"])

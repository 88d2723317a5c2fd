"""The decode-once cache as a memory-mapped .npy: exact pixels, served from the map, damage rebuilt.

Real files throughout: small JPEGs and PNGs written with PIL, decoded by a forked worker pool.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import arrays
from cxr.decoding import decode_image, load_split
from tests.conftest import REPO

SIZE = 32


def write_images(folder, count, start=0):
    """`count` noise images of varied shapes, every third a PNG; their (path, label)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (int(rng.integers(40, 90)), int(rng.integers(40, 90))), np.uint8)
        path = folder / f"{i:03d}.{'png' if i % 3 == 0 else 'jpeg'}"
        Image.fromarray(pixels).save(path)
        items.append((str(path), i % 2))
    return items


def unreadable(folder, name):
    path = folder / name
    path.write_bytes(b"not an image at all")
    return str(path)


def cache_files(cache):
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def items(tmp_path):
    """70 images (enough for the worker pool) with an unreadable file in the middle and at the end."""
    listed = write_images(tmp_path / "images", 70)
    listed.insert(35, (unreadable(tmp_path / "images", "middle.jpeg"), 1))
    listed.append((unreadable(tmp_path / "images", "last.png"), 0))
    return listed


def test_cache_holds_exactly_the_decoded_pixels_and_lists_the_unreadable(items, tmp_path, monkeypatch):
    # chunks of 8 images: the build writes several windows, and cuts the file short at the end
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 8 * SIZE * SIZE)
    for attempt in ("built", "read back"):
        split = load_split(items, SIZE, tmp_path / "cache", 2, "test")
        readable = [(p, label) for p, label in items if "middle" not in p and "last" not in p]
        assert split.paths == [p for p, _ in readable], attempt
        assert split.skipped == {items[35][0]: "not an image file", items[-1][0]: "not an image file"}, attempt
        assert split.images.shape == (70, 1, SIZE, SIZE) and split.images.dtype == torch.uint8
        assert split.labels.tolist() == [label for _, label in readable]
        for path, image in zip(split.paths, split.images, strict=True):
            assert np.array_equal(image[0].numpy(), decode_image(path, SIZE)), (attempt, path)
    (array_file,) = (tmp_path / "cache").glob("*.npy")
    assert np.load(array_file).shape == (70, SIZE, SIZE)  # a plain .npy, no slots left over
    assert array_file.stat().st_size == np.load(array_file, mmap_mode="r").offset + 70 * SIZE * SIZE
    assert not [name for name in cache_files(tmp_path / "cache") if name.endswith(".tmp")]


def test_second_load_is_served_from_the_file_map_without_decoding(items, tmp_path):
    first = load_split(items, SIZE, tmp_path / "cache", 2, "test")
    # Break one image but keep its size and mtime (the cache key): decoding it now would skip it.
    path = first.paths[10]
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert decode_image(path, SIZE) == "not an image file"
    second = load_split(items, SIZE, tmp_path / "cache", 2, "test")
    assert second.paths == first.paths and torch.equal(second.images, first.images)
    # The tensor is a map of the cache file, not a copy: a change written to the file shows through.
    (array_file,) = (tmp_path / "cache").glob("*.npy")
    offset, before = np.load(array_file, mmap_mode="r").offset, second.images[20].clone()
    with open(array_file, "r+b") as f:
        f.seek(offset + 20 * SIZE * SIZE)
        f.write(bytes([7]) * SIZE * SIZE)
    assert (second.images[20] == 7).all() and not (before == 7).all()
    assert second.images.is_contiguous() and second.images.device.type == "cpu"


@pytest.mark.parametrize("damage", ["truncated", "extended", "other images of the same shape"])
def test_damaged_array_is_detected_and_rebuilt(items, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    built = load_split(items, SIZE, cache, 2, "test")
    expected = built.images.clone()
    del built  # its map would show an in-place change to the file
    (array_file,) = cache.glob("*.npy")
    if damage == "truncated":
        os.truncate(array_file, array_file.stat().st_size - SIZE * SIZE // 2)
    elif damage == "extended":
        with open(array_file, "ab") as f:
            f.write(b"\0" * SIZE * SIZE)
    else:
        np.save(array_file, 255 - np.load(array_file))
    with caplog.at_level(logging.WARNING, logger="cxr"):
        rebuilt = load_split(items, SIZE, cache, 2, "test")
    assert [r for r in caplog.records if "rebuilding it" in r.getMessage()]
    assert torch.equal(rebuilt.images, expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxr"):
        again = load_split(items, SIZE, cache, 2, "test")  # the rebuilt pair is accepted
    assert not caplog.records and torch.equal(again.images, expected)


def test_multi_label_tuples_round_trip(tmp_path):
    listed = write_images(tmp_path / "images", 6)
    findings = [(1, 0, -1), (0, 0, 0), (-1, 1, 1), (1, 1, 0), (0, -1, 1), (1, 0, 0)]
    items = [(path, labels) for (path, _), labels in zip(listed, findings, strict=True)]
    for _ in ("built", "read back"):
        split = load_split(items, SIZE, tmp_path / "cache", 0, "test")
        assert split.labels.dtype == torch.int64 and split.labels.tolist() == [list(f) for f in findings]
    (index,) = (tmp_path / "cache").glob("*.json")
    assert json.loads(index.read_text())["labels"] == [list(f) for f in findings]


def test_a_split_of_unreadable_files_only_is_cached_empty(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    items = [(unreadable(folder, f"{i}.jpeg"), 0) for i in range(3)]
    for _ in ("built", "read back"):
        split = load_split(items, SIZE, tmp_path / "cache", 0, "test")
        assert len(split) == 0 and split.images.shape == (0, 1, SIZE, SIZE)
        assert list(split.skipped) == [path for path, _ in items] and split.labels.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Item 9: a full disk, stale temporary files, workers of a killed process

def in_subprocess(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs (a real full disk) needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


LOAD_SPLIT = """
import sys
from pathlib import Path
from cxr.data import DataError
from cxr.decoding import load_split
items = [(path, 0) for path in sys.argv[2:]]
try:
    split = load_split(items, 128, Path(sys.argv[1]), 2, "train")
except DataError as error:
    print(f"DataError: {error}")
    sys.exit(1)
print(len(split))
"""


def test_item9_a_full_disk_is_one_line_naming_the_folder_and_bytes_and_leaves_no_file(tmp_path, small_disk):
    """96 decoded images of 128 x 128 need 1,572,864 bytes (and a .npy header) on a 1 MiB disk."""
    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300), np.uint8)).save(image)
    paths = []
    for i in range(96):
        paths.append(str(tmp_path / f"{i:03d}.png"))
        os.link(image, paths[-1])
    done = in_subprocess(LOAD_SPLIT, str(small_disk), *paths)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])  # not -7: SIGBUS writing the map
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("DataError")]
    assert str(small_disk) in line and f"{96 * 128 * 128 + 128:,} bytes" in line, line
    assert cache_files(small_disk) == []  # no partial .npy, no .tmp


def test_item9_stale_temporary_files_of_dead_writers_are_removed(items, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a writer that is gone: its pid is not alive
    host = socket.gethostname()
    dead = cache / f".{'ab' * 16}.npy.{host}-{finished.pid}.tmp"
    alive = cache / f".{'cd' * 16}.npy.{host}-{os.getpid()}.tmp"  # a writer still at work
    elsewhere = cache / f".{'ef' * 16}.npy.other-host-{finished.pid}.tmp"  # another host's, on a shared disk
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"\0" * 1000)
    load_split(items, SIZE, cache, workers=0, desc="t")
    assert not dead.exists() and alive.exists() and elsewhere.exists()


DECODE_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from cxr.decoding import decoded_images
for image in decoded_images(sys.argv[1:], 64, 2, "t"):
    children = {int(pid) for task in Path("/proc/self/task").iterdir()
                for pid in (task / "children").read_text().split()}
    print(" ".join(map(str, sorted(children))), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the worker pids from /proc")
def test_item9_decode_workers_end_when_their_parent_is_killed(tmp_path):
    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 1500), np.uint8)).save(image)
    log = tmp_path / "log"
    with open(log, "w") as out:  # a file: orphans holding a pipe would keep its reader waiting
        dying = subprocess.Popen([sys.executable, "-c", DECODE_THEN_DIE, *[str(image)] * 200], cwd=REPO,
                                 stdout=out, stderr=subprocess.STDOUT)
        assert dying.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-2000:]
    workers = [int(pid) for pid in log.read_text().split()]
    assert len(workers) == 2, log.read_text()
    deadline = time.monotonic() + 20
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [pid for pid in workers if process_alive(pid)]
    for pid in orphans:  # started by this test: ended here whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert orphans == []

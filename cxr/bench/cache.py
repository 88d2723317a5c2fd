"""`python -m cxr.bench cache`: the decode cache's build, its speed and its peak memory against the
number of images.

Each build runs in a fresh process, so that its peak RSS is its own: img/s, and the peak memory of
the process (above its RSS after the imports) and of its decode workers, which should not grow
with the count; beside it (unless --no-compare) the in-memory decode the cache was built from
before it was a memory map, whose peak grows by count x size^2 bytes (twice that while it stacks).
A forked worker's RSS counts the parent's pages it shares, so its peak is about the parent's
baseline. The same pictures as 12-bit rescaled DICOM files (`dicom`: how hospitals export them)
are then cached the same way, for DICOM's decode img/s beside the JPEGs'.
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr.bench.images import dicom_copies, image_source, repeat_images
from cxr.bench.options import add_common, add_images, add_scale, scale_of, work_folder
from cxr.bench.timing import machine, peak_rss_mb, publish
from cxr.data import find_classes, list_files
from cxr.decoding import decode_split, load_split

HELP = "the decode cache's build alone: img/s and peak memory as the image count grows"


@dataclass(frozen=True)
class Scale:
    counts: tuple[int, ...]
    size: int
    distinct: int


FULL = Scale(counts=(2000, 8000), size=224, distinct=40)
QUICK = Scale(counts=(64, 128), size=32, distinct=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scale(parser, FULL, QUICK, {"counts": "images per build (links cycling over the originals)",
                                    "size": "resolution (px)",
                                    "distinct": "originals to generate when no folder is given"})
    parser.add_argument("--no-compare", action="store_true", help="skip the in-memory decode it is compared with")
    add_images(parser)
    add_common(parser, "cache", "seconds: 64 and 128 small images", device=False)


def build_child(folder: str, size: str, cache_dir: str, mode: str) -> None:
    """Run in a fresh process, so that its peak RSS is this build's alone: build the cache of
    folder/<class>/* (mode "mapped", as cxr trains) or decode the split into memory (mode
    "in_memory": decode_split); print a JSON line of seconds and peak RSS (MB) of this process and
    of its decode workers."""
    items = list_files(Path(folder), find_classes(Path(folder)))
    # the imports (torch, hydra, ...) peak at several hundred MB: not the build's, so on Linux the
    # high-water mark is reset to the current RSS here (elsewhere it keeps the imports' peak)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    baseline_mb = peak_rss_mb(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if mode == "mapped":
        split = load_split(items, int(size), Path(cache_dir), 0, "bench")
    else:
        split = decode_split(items, int(size), 0, "bench")
    build_s = time.perf_counter() - started
    figures = {"images": len(split), "build_s": build_s, "build_img_s": len(split) / build_s,
               "baseline_mb": baseline_mb, "peak_mb": peak_rss_mb(resource.RUSAGE_SELF),
               "workers_peak_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}
    if mode == "mapped":
        started = time.perf_counter()
        split = load_split(items, int(size), Path(cache_dir), 0, "bench")  # served from the map
        figures["read_s"] = time.perf_counter() - started
    print(json.dumps(figures))


def build_in_child(folder: Path, size: int, cache_dir: Path, mode: str) -> dict:
    command = [sys.executable, "-c", "import sys; from cxr.bench.cache import build_child; build_child(*sys.argv[1:])",
               str(folder), str(size), str(cache_dir), mode]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["growth_mb"] = figures["peak_mb"] - figures["baseline_mb"]
    return figures


def measure(source: Path, scale: Scale, work: Path, compare: bool) -> dict:
    """Each count's builds: `mapped` (as cxr trains) and `in_memory` (compare) of the source's
    images, and `dicom`: the mapped build of the same pictures as DICOM files."""
    report = {"size": scale.size, "counts": list(scale.counts), "array_mb": {}, "mapped": {}, "in_memory": {},
              "dicom": {}}
    dicoms = dicom_copies(source, work / "dicom-source")
    for count in scale.counts:
        report["array_mb"][count] = count * scale.size * scale.size / 2**20
        builds = [("mapped", source, "mapped"), *([("in_memory", source, "in_memory")] if compare else []),
                  ("dicom", dicoms, "mapped")]
        for name, originals, mode in builds:
            folder = work / f"{name}-images-{count}"
            repeat_images(originals, folder, count)
            figures = report[name][count] = build_in_child(folder, scale.size, work / f"{name}-cache-{count}", mode)
            print(f"cache  {name:9s} {count:6d} images @{scale.size} px ({report['array_mb'][count]:.0f} MB uint8): "
                  f"{figures['build_img_s']:.0f} img/s, parent peak {figures['peak_mb']:.0f} MB "
                  f"(+{figures['growth_mb']:.0f} over its imports), workers peak {figures['workers_peak_mb']:.0f} MB"
                  + (f", read back in {figures['read_s']:.2f} s" if "read_s" in figures else ""), flush=True)
    return report


def run(args: argparse.Namespace) -> dict:
    scale = scale_of(args, FULL, QUICK)
    with work_folder(args.work, "cache") as work:
        source = image_source(args.images, scale.distinct, work.path)
        print(f"{os.cpu_count()} cores; images from {source}", flush=True)
        report = {**machine(torch.device("cpu")), "quick": args.quick, "source": str(source),
                  **measure(source, scale, work.path, compare=not args.no_compare)}
    publish(report, args.out)
    return report

"""`python -m cxr.bench loader`: img/s of getting images into training batches, on the CPU.

The naive torchvision pipeline (ImageFolder + PIL + Resize + ToTensor in a DataLoader with a
worker per core) against building cxr's decode-once cache, reading it into the uint8 batches the
trainer slices, and the same batches normalised (on a GPU that runs there, inside the step). The
headline ratio compares normalised float batches on both sides.
"""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cxr.batches import preprocess, train_batches
from cxr.bench.images import describe_source, image_source, repeat_images
from cxr.bench.options import add_common, add_images, add_scale, scale_of, work_folder
from cxr.bench.timing import machine, publish, show, side_by_side
from cxr.decoding import load_split

HELP = "the naive torchvision loader vs building and reading the decode-once cache (img/s)"


@dataclass(frozen=True)
class Scale:
    count: int
    size: int
    batch_size: int
    repeats: int
    distinct: int


FULL = Scale(count=320, size=224, batch_size=32, repeats=3, distinct=40)
QUICK = Scale(count=24, size=32, batch_size=8, repeats=1, distinct=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scale(parser, FULL, QUICK, {
        "count": "images per pass (links cycling over the originals)", "size": "resolution (px)",
        "batch_size": "images per batch", "repeats": "timings of each alternative (median)",
        "distinct": "originals to generate when no folder of images is given"})
    add_images(parser)
    add_common(parser, "loader", "seconds: a few small images, one timing each", device=False)


def measure(folder: Path, items: list[tuple[str, int]], scale: Scale, work: Path) -> dict:
    """The four ways to batches, alternating within each of scale.repeats rounds."""
    size, batch_size = scale.size, scale.batch_size
    naive_set = datasets.ImageFolder(str(folder), transforms.Compose([transforms.Resize((size, size)),
                                                                      transforms.ToTensor()]))
    workers = os.cpu_count() or 1
    builds = iter(range(scale.repeats))
    cache_dir = work / "cache"
    load_split(items, size, cache_dir, 0, "bench")  # the cache that `cached` reads

    def naive() -> int:
        return sum(len(labels) for _, labels in DataLoader(naive_set, batch_size, shuffle=True, num_workers=workers))

    def build() -> int:  # into a fresh folder every round: decode and write, as a first run does
        return len(load_split(items, size, work / f"build{next(builds)}", 0, "bench"))

    def cached(normalise: bool = False) -> int:
        seen = 0
        for images, _ in train_batches(load_split(items, size, cache_dir, 0, "bench"), batch_size, epoch=0, seed=0):
            if normalise:
                preprocess(images, channels_last=True)
            seen += len(images)
        return seen

    s = side_by_side({"naive": naive, "build": build, "cached": cached,
                      "normalised": lambda: cached(normalise=True)}, scale.repeats, torch.device("cpu"))
    return {"size": size, "batch_size": batch_size, "images": len(items), "workers": workers,
            "images_per_pass": {name: figures["images"] for name, figures in s.items()},
            "naive_img_s": s["naive"]["img_s"], "cache_build_img_s": s["build"]["img_s"],
            "cached_img_s": s["cached"]["img_s"], "cached_normalised_img_s": s["normalised"]["img_s"],
            "cache_build_vs_naive": s["naive"]["s"] / s["build"]["s"],
            "cached_vs_naive": s["naive"]["s"] / s["cached"]["s"],
            "cached_normalised_vs_naive": s["naive"]["s"] / s["normalised"]["s"]}


def run(args: argparse.Namespace) -> dict:
    scale = scale_of(args, FULL, QUICK)
    with work_folder(args.work, "loader") as work:
        source = image_source(args.images, scale.distinct, work.path)
        items = repeat_images(source, work.path / "images", scale.count)
        report = {**machine(torch.device("cpu")), "quick": args.quick, "source": describe_source(source, items)}
        report.update(measure(work.path / "images", items, scale, work.path))
    show("loader", report, "naive_img_s", "cache_build_img_s", "cached_normalised_img_s")
    # normalised float batches on both sides: what the trainer gets from either loader
    report["targets"] = {"cached >= 20x naive": report["cached_normalised_vs_naive"] >= 20,
                         "cache_build >= 2x naive": report["cache_build_vs_naive"] >= 2}
    publish(report, args.out)
    return report

"""`python -m cxr.bench`: where the time goes, measured side by side in one run on the same images.

    loader  img/s at --size: the naive torchvision pipeline (ImageFolder + PIL + Resize + ToTensor
            in a DataLoader with a worker per core) vs building our decode-once cache vs reading
            it into the uint8 batches the trainer gets (and, apart, normalising them on the CPU)
    train   img/s at --train-size: a bare forward/backward/step loop over in-memory tensors vs the
            real trainer (engine.train_one_epoch on data.train_batches + preprocess), same model,
            optimizer, batch and precision
    frozen  one backbone pass over the images vs the reference's seven head variants run as the
            real frozen-backbone sweep (a multirun in a subprocess): extraction once, plus every
            per-job cost a sweep pays (process start, checkpoints, bootstrap, figures, report)
    gpu     CUDA only: trainer img/s at --size with AMP and channels_last, and the share of the
            wall time in which the GPU ran a kernel or a copy

Model, optimizer, precision and memory format come from conf/train.yaml, as `python -m cxr.train`
composes them (weights=null: the timing does not depend on them). Images: the full-resolution
originals in $CXR_SHARED_DATA/cxr-fullres when set, else generated ones of their sizes and bytes
per pixel; the few files are repeated through symlinks to --count so timings are stable. The
alternatives of a section alternate within each of --repeats rounds, so noise from other processes
hits them alike, and every figure is a median.

`--cache-suite` runs only the cache build, at --cache-counts images (2,000 and 8,000) of --size px,
each build in a fresh process: its img/s and the peak RSS of the process and of its decode workers,
beside the in-memory decode it replaced (--no-compare skips that): the memory-mapped build's peak
stays flat as the count grows. Written to outputs/bench/cache.json.

`--gpu-suite` runs the GPU check instead, the one script to run where a GPU is lent (see
GPU_SUITE_KEYS for its JSON): the real trainer's img/s at 224 px in fp32, bf16, bf16 +
channels_last and under torch.compile, the GPU's busy fraction, and the seed-scale sweep (seven
variants on 5,216 generated images) timed at 1, 2 and 4 jobs per GPU and on the frozen-backbone
path, with each job's peak GPU memory. With --quick it runs the same sections at toy size on a CPU.
"""

import argparse
import contextlib
import csv
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cxr import results
from cxr.batches import preprocess, train_batches
from cxr.config import CONF_DIR, register_configs
from cxr.data import LAYOUTS, find_classes, list_files, load_dataset, split_by_patient, subset
from cxr.decoding import Split, decode_split, load_split
from cxr.engine import autocast, train_one_epoch
from cxr.features import TrainingView, extract, training_view
from cxr.model import build_model, build_optimizer
from cxr.runtime import amp_setup, device_name, pick_device
from cxr.synthetic import render_chest

# measured on cxr-fullres: real radiographs take about 0.2 bytes per pixel as JPEG; a smooth
# upscale takes half that, so generated images get this much film grain at full size
GRAIN = 3.0


# ---------------------------------------------------------------------------------------------
# Images and timing


def generate_images(folder: Path, count: int, seed: int = 0) -> None:
    """Chest-like JPEGs of the full-resolution set's sizes (0.8-2.6 Mpx) and bytes per pixel."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = "NORMAL" if i % 4 == 0 else "PNEUMONIA"
        height = int(rng.integers(800, 1800))
        width = int(height * rng.uniform(1.0, 1.45))
        # drawn small and upscaled, as cxr.synthetic does: a full-size render takes seconds
        small = render_chest(rng, 320, round(320 * width / height), pneumonia=label == "PNEUMONIA")
        pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC),
                            np.float32) + rng.normal(0, GRAIN, (height, width))
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / label / f"{i}.jpeg",
                                                                       quality=90)


def repeat_images(source: Path, folder: Path, count: int) -> list[tuple[str, int]]:
    """`count` symlinks in folder/<class>/ cycling over source/<class>/* (shuffled, so that a
    small count still holds every class); their (path, label)."""
    classes = find_classes(source)
    originals = list_files(source, classes)
    order = np.random.default_rng(0).permutation(len(originals))
    for k in range(count):
        path, label = originals[order[k % len(originals)]]
        link = folder / classes[label] / f"{k:05d}_{Path(path).name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(path).resolve())
    return list_files(folder, classes)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict:
    """Median seconds of each function, the functions alternating within every round."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in seconds.items()}


def busy_fraction(fn: Callable[[], object], device: torch.device) -> float:
    """Share of fn's wall time in which the GPU ran something (union of kernel and copy spans)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # no CPU events: little overhead
        wall_s = timed(fn, device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy_us, covered_to = 0.0, -math.inf
    for start, end in spans:  # overlapping spans (several streams) count once
        if end > covered_to:
            busy_us += end - max(start, covered_to)
            covered_to = end
    return min(1.0, busy_us / 1e6 / wall_s)


# ---------------------------------------------------------------------------------------------
# Sections


def bench_loader(root: Path, items, size: int, batch_size: int, repeats: int, work: Path) -> dict:
    naive_set = datasets.ImageFolder(str(root), transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor()]))
    workers = os.cpu_count() or 1
    builds = iter(range(repeats))
    cache_dir = work / "cache"
    load_split(items, size, cache_dir, 0, "bench")  # the cache that `cached` reads

    def naive():
        for _ in DataLoader(naive_set, batch_size, shuffle=True, num_workers=workers):
            pass

    def build():  # into a fresh folder every round: decode and write, as a first run does
        load_split(items, size, work / f"build{next(builds)}", 0, "bench")

    def cached(normalise: bool = False):
        split = load_split(items, size, cache_dir, 0, "bench")
        for images, _ in train_batches(split, batch_size, epoch=0, seed=0):
            if normalise:  # on a GPU this runs there, inside the trainer's step
                preprocess(images, channels_last=True)

    s = side_by_side({"naive": naive, "build": build, "cached": cached,
                      "normalised": lambda: cached(normalise=True)}, repeats, torch.device("cpu"))
    n = len(items)
    return {"size": size, "images": n, "workers": workers,
            "naive_img_s": n / s["naive"], "cache_build_img_s": n / s["build"],
            "cached_img_s": n / s["cached"], "cached_normalised_img_s": n / s["normalised"],
            "cache_build_vs_naive": s["naive"] / s["build"],
            "cached_vs_naive": s["naive"] / s["cached"],
            "cached_normalised_vs_naive": s["naive"] / s["normalised"]}


def trainer_epoch(view: TrainingView, optimizer, cfg, device, amp_dtype, scaler, epoch: int):
    """One epoch of the real trainer (as cxr.train.fit runs it): shuffled device batches,
    normalised on the device."""
    batches = view.train_inputs(cfg.trainer.batch_size, epoch, cfg.seed, augment=None)
    train_one_epoch(view.module, optimizer, batches, device=device, epoch=epoch, amp_dtype=amp_dtype,
                    scaler=scaler, log_every=cfg.trainer.log_every,
                    total=math.ceil(len(view.train) / cfg.trainer.batch_size), progress=False)


def training_setup(cfg, split: Split, device: torch.device):
    """The model, its training view, optimizer, autocast dtype and scaler, as cxr.train builds them."""
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = build_model(cfg.model, split.images.shape[-1], 2).to(device, memory_format=memory_format)
    amp_dtype, scaler = amp_setup(cfg.trainer.amp, device)
    view = training_view(model, (split, split, split), cfg, device, amp_dtype)
    return model, view, build_optimizer(view.module, cfg.optimizer), amp_dtype, scaler


def trainer_run(split: Split, cfg, device: torch.device, compile_model: bool = False) -> Callable[[], None]:
    """One epoch of the real trainer per call, on `split` (on `device`), built as cxr.train builds
    it; compiled as `trainer.compile=true` compiles it (Runtime.wrap) if asked."""
    _, view, optimizer, amp_dtype, scaler = training_setup(cfg, split, device)
    if compile_model:
        view = dataclasses.replace(view, module=torch.compile(view.module))
    epochs = itertools.count(1)
    return lambda: trainer_epoch(view, optimizer, cfg, device, amp_dtype, scaler, next(epochs))


def sized(split: Split, count: int) -> Split:
    """`count` images of the split, its images repeated as often as needed."""
    copies = math.ceil(count / len(split))
    return Split(split.images.repeat(copies, 1, 1, 1)[:count], split.labels.repeat(copies)[:count], [])


def bench_train(split: Split, cfg, device: torch.device, repeats: int) -> dict:
    """Both loops over the same few batches: short timings, so that many alternate in a minute."""
    batch, n = cfg.trainer.batch_size, len(split)
    split = split.to(device)
    model, view, optimizer, amp_dtype, scaler = training_setup(cfg, split, device)
    inputs = preprocess(split.images, cfg.trainer.channels_last)
    epochs = iter(range(1, repeats + 1))

    def bare(count: int = n):
        model.train()
        for start in range(0, count, batch):
            with autocast(device, amp_dtype):
                loss = F.cross_entropy(model(inputs[start:start + batch]).float(),
                                       split.labels[start:start + batch])
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

    def trainer():
        trainer_epoch(view, optimizer, cfg, device, amp_dtype, scaler, next(epochs))

    bare(2 * batch)  # warm-up: first-call allocations and kernel choices
    s = side_by_side({"bare": bare, "trainer": trainer}, repeats, device)
    return {"size": split.images.shape[-1], "batch_size": batch, "images": n,
            "bare_img_s": n / s["bare"], "trainer_img_s": n / s["trainer"],
            "trainer_vs_bare": s["bare"] / s["trainer"]}


def head_variants() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("resultset*.yaml"))


def kaggle_layout(items, folder: Path) -> Path:
    """folder/{train,test}/<class>/ of links to `items` (of each class, every seventh to test)."""
    seen: dict[str, int] = {}
    for path, _ in items:
        label = Path(path).parent.name
        seen[label] = seen.get(label, -1) + 1
        split = "test" if seen[label] % 7 == 0 else "train"
        link = folder / split / label / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.realpath(path))
    return folder


def run_sweep(overrides: list[str], sweep_dir: Path) -> tuple[float, list[dict]]:
    """A real multirun as a user starts it (`python -m cxr.train -m ...`) in a subprocess: its
    wall seconds and its jobs' result records in job order ({} for a job that wrote none)."""
    command = [sys.executable, "-m", "cxr.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(CONF_DIR).parent)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-2000:] + done.stderr[-2000:])
    jobs = sorted((job for job in sweep_dir.glob("*_*") if job.is_dir()), key=lambda job: int(job.name.split("_")[0]))
    return seconds, [results.read(job) or {} for job in jobs]


def bench_frozen(items, size: int, variants: list[str], cfg, args, device: torch.device, work: Path) -> dict:
    """One backbone pass over the images vs the reference's head variants as the real sweep a user
    runs (`python -m cxr.train -m experiment=... model.freeze_backbone=true`), with every per-job
    cost it pays: process start, loading, one feature extraction shared through the cache,
    checkpoints, bootstrap intervals, TensorBoard figures, the report. One timing of each."""
    root = kaggle_layout(items, work / "kaggle")
    model = build_model(cfg.model, size, 2).to(device)
    amp_dtype, _ = amp_setup(cfg.trainer.amp, device)
    split = load_split(list_files(root / "train", find_classes(root / "train")), size, work / "cache", 0,
                       "bench").to(device)
    extract(model.backbone, Split(split.images[:8], split.labels[:8], []), 8, device, amp_dtype, True)  # warm-up
    one_pass = timed(lambda: extract(model.backbone, split, 128, device, amp_dtype, True), device)
    sweep_s, records = run_sweep([f"experiment={','.join(variants)}", "model.freeze_backbone=true",
                                  "model.weights=null", "data=chest_xray", f"data.root={root}",
                                  f"data.image_size={size}", f"data.cache_dir={work / 'sweep-cache'}",
                                  f"trainer.epochs={args.head_epochs}", f"trainer.batch_size={args.batch_size}",
                                  f"trainer.device={device}", "trainer.progress=false"], work / "sweep")
    jobs_ok = sum(record.get("status") == results.OK for record in records)
    return {"size": size, "images": len(items), "train_images": len(split), "variants": variants,
            "epochs": args.head_epochs, "jobs_ok": jobs_ok, "one_backbone_pass_s": one_pass,
            "sweep_s": sweep_s, "per_job_beyond_one_pass_s": (sweep_s - one_pass) / len(variants),
            "sweep_vs_one_pass": sweep_s / one_pass}


def bench_gpu(split: Split, cfg, device: torch.device, repeats: int, images: int) -> dict:
    """The real trainer on the GPU at the seed's resolution, on enough images for long epochs."""
    split = sized(split, images).to(device)
    epoch = trainer_run(split, cfg, device)
    epoch()  # warm-up: cudnn.benchmark tries its kernels on the first batches
    s = side_by_side({"trainer": epoch}, repeats, device)
    return {"size": split.images.shape[-1], "batch_size": cfg.trainer.batch_size,
            "images": len(split), "amp": str(amp_setup(cfg.trainer.amp, device)[0]),
            "channels_last": cfg.trainer.channels_last,
            "trainer_img_s": len(split) / s["trainer"],
            "busy_fraction": busy_fraction(epoch, device)}


# ---------------------------------------------------------------------------------------------
# The GPU check (--gpu-suite): the one prepared script to run where a GPU is lent


@dataclass(frozen=True)
class SuiteScale:
    """How much the GPU suite runs. FULL is the seed's data scale (5,216 train and 624 test images
    at 224 px, seven variants), sized for under 10 minutes on an H100-class GPU: the full-network
    sweeps run 2 of the seed's 20 epochs (each job's time beyond them is per-job cost, the same at
    20), the frozen-backbone sweep all 20 (its heads train in seconds). QUICK runs every section at
    toy size on a CPU, so that the script is known to work before a GPU is spent on it."""

    image_size: int
    train_images: int  # generated; validation is carved out of them by patient (10%), as from Kaggle's
    test_images: int
    batch_size: int
    trainer_images: int  # per timed trainer epoch; a multiple of batch_size: torch.compile sees one shape
    repeats: int  # timed epochs per trainer variant (their median counts)
    sweep_epochs: int
    frozen_epochs: int
    jobs_per_gpu: tuple[int, ...]


FULL = SuiteScale(224, 5216, 624, 32, 2048, 3, 2, 20, (1, 2, 4))
QUICK = SuiteScale(64, 64, 32, 8, 8, 1, 1, 2, (1, 2))
# the trainer's precision variants: name -> (trainer.amp, trainer.channels_last, torch.compile)
TRAINER_VARIANTS = {"fp32": ("off", False, False), "bf16": ("bf16", False, False),
                    "bf16_channels_last": ("bf16", True, False), "compile": ("bf16", True, True)}
# the timed sweeps of the seven variants: name -> (jobs_per_gpu, model.freeze_backbone)
SUITE_SWEEPS = {"jobs_per_gpu_1": (1, False), "jobs_per_gpu_2": (2, False), "jobs_per_gpu_4": (4, False),
                "frozen": (1, True)}
SWEEP_KEYS = ("jobs_per_gpu", "freeze_backbone", "epochs", "jobs", "jobs_ok", "sweep_s", "train_s",
              "gpu_busy_fraction", "peak_gpu_memory_mb")
# every key of the suite's JSON, on any device (dotted paths): a value that could not be measured
# is null, and `skipped` holds why under its path or a prefix of it
GPU_SUITE_KEYS = ("device", "torch", "quick", "scale", "data_prep_s",
                  *(f"trainer_img_s.{name}" for name in TRAINER_VARIANTS), "compile_s", "busy_fraction",
                  *(f"sweeps.{name}.{key}" for name in SUITE_SWEEPS for key in SWEEP_KEYS),
                  "all_jobs_ok", "skipped", "total_s")
NO_CUDA = "no CUDA device"


class BusySampler:
    """Mean GPU busy fraction while the block runs: torch.cuda.utilization (NVML: the share of the
    last sample period in which any kernel ran on the GPU) read every `every` seconds. NVML sees
    the sweep's worker processes, which a profiler in this process cannot."""

    def __init__(self, device: torch.device, every: float = 0.5):
        self.device, self.every = device, every
        self.samples: list[float] = []
        self.reason: str | None = NO_CUDA if device.type != "cuda" else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "BusySampler":
        if self.reason is None:
            try:
                torch.cuda.utilization(self.device)
            except Exception as error:  # no NVML bindings, or a driver that does not answer them
                self.reason = f"torch.cuda.utilization: {type(error).__name__}: {error}".splitlines()[0]
            else:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(torch.cuda.utilization(self.device) / 100)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if not self.samples:
                self.reason = "the block ended before the first sample"

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def suite_overrides(scale: SuiteScale, device: torch.device, work: Path) -> list[str]:
    """What the suite's runs change in conf/train.yaml: the embedded dataset at the suite's scale
    (generated and decoded once into work/cache, which every sweep job reads), random init (a bare
    GPU machine has no network for ImageNet weights)."""
    return [f"data.image_size={scale.image_size}", f"data.synthetic.train={scale.train_images}",
            "data.synthetic.val=4", f"data.synthetic.test={scale.test_images}",  # val: carved from train
            f"data.cache_dir={work / 'cache'}", "model.weights=null", f"trainer.batch_size={scale.batch_size}",
            f"trainer.device={device}", "trainer.progress=false"]


def variant_run(split: Split, cfg, device: torch.device, name: str) -> Callable[[], None]:
    """trainer_run in one of TRAINER_VARIANTS."""
    amp, channels_last, compile_model = TRAINER_VARIANTS[name]
    cfg = OmegaConf.merge(cfg, {"trainer": {"amp": amp, "channels_last": channels_last}})
    return trainer_run(split, cfg, device, compile_model)


def suite_trainer(split: Split, cfg, device: torch.device, scale: SuiteScale, report: dict) -> None:
    """img/s of the real trainer's epoch in fp32, bf16 and bf16 + channels_last, side by side, and
    the GPU's busy fraction in the last (the trainer's default on CUDA). Compile comes last."""
    split = sized(split, scale.trainer_images).to(device)
    epochs = {name: variant_run(split, cfg, device, name) for name in ("fp32", "bf16", "bf16_channels_last")}
    for epoch in epochs.values():
        epoch()  # warm-up: cudnn.benchmark tries its kernels on the first batches
    seconds = side_by_side(epochs, scale.repeats, device)
    report["trainer_img_s"] = {**{name: len(split) / s for name, s in seconds.items()}, "compile": None}
    if device.type == "cuda":
        report["busy_fraction"] = busy_fraction(epochs["bf16_channels_last"], device)
    else:
        report["busy_fraction"] = None
        report["skipped"]["busy_fraction"] = f"{NO_CUDA}: the share of wall time a GPU runs kernels"
    shown = "  ".join(f"{name} {value:.4g}" for name, value in report["trainer_img_s"].items() if value)
    print(f"trainer img/s @{scale.image_size} px  {shown}  busy fraction {report['busy_fraction']}", flush=True)


def suite_sweep(name: str, scale: SuiteScale, overrides: list[str], device: torch.device, work: Path,
                skipped: dict) -> dict:
    """The seven variants as the real multirun on the per_gpu launcher (`jobs_per_gpu` side by side
    on each GPU; on a CPU, side by side on it), its wall time, the GPU's busy fraction meanwhile and
    each job's peak GPU memory from its result.json."""
    jobs_per_gpu, frozen = SUITE_SWEEPS[name]
    epochs = scale.frozen_epochs if frozen else scale.sweep_epochs
    variants = head_variants()
    with BusySampler(device) as busy:
        seconds, records = run_sweep([f"experiment={','.join(variants)}", "hydra/launcher=per_gpu",
                                      f"jobs_per_gpu={jobs_per_gpu}", f"model.freeze_backbone={str(frozen).lower()}",
                                      f"trainer.epochs={epochs}", *overrides], work / f"sweep-{name}")
    peaks = [record.get("peak_gpu_memory_mb") for record in records]
    figures = {"jobs_per_gpu": jobs_per_gpu, "freeze_backbone": frozen, "epochs": epochs, "jobs": len(variants),
               "jobs_ok": sum(record.get("status") == results.OK for record in records), "sweep_s": seconds,
               "train_s": sum((record.get("time") or {}).get("train_ms", 0) for record in records) / 1000,
               "gpu_busy_fraction": busy.mean,
               "peak_gpu_memory_mb": peaks if any(peak is not None for peak in peaks) else None}
    if busy.reason:
        skipped[f"sweeps.{name}.gpu_busy_fraction"] = busy.reason
    if figures["peak_gpu_memory_mb"] is None:
        skipped[f"sweeps.{name}.peak_gpu_memory_mb"] = NO_CUDA if device.type != "cuda" else "no job recorded it"
    print(f"sweep {name:15s} {figures['jobs_ok']}/{figures['jobs']} ok  {seconds:.1f} s (train "
          f"{figures['train_s']:.1f} s, {epochs} epochs)  busy {busy.mean}  peak MiB {peaks}", flush=True)
    return figures


def suite_compile(split: Split, cfg, device: torch.device, scale: SuiteScale, report: dict) -> None:
    """The bf16 channels_last trainer under torch.compile: its first epoch (compilation included)
    and the median img/s of the next. Last, being the slowest section and the likeliest to fail."""
    report["compile_s"] = None
    if device.type != "cuda":
        reason = f"{NO_CUDA}: torch.compile is timed on a GPU only (the trainer it speeds up there)"
    else:
        split = sized(split, scale.trainer_images).to(device)
        epoch = variant_run(split, cfg, device, "compile")
        try:
            compile_s = timed(epoch, device)
            seconds = side_by_side({"compile": epoch}, scale.repeats, device)["compile"]
        except Exception as error:  # a compiler failure is a finding of the check, not its end
            reason = f"torch.compile failed: {type(error).__name__}: {error}".splitlines()[0]
        else:
            report["compile_s"], report["trainer_img_s"]["compile"] = compile_s, len(split) / seconds
            print(f"compile: first epoch {compile_s:.1f} s, then {len(split) / seconds:.4g} img/s")
            return
    report["skipped"]["compile_s"] = report["skipped"]["trainer_img_s.compile"] = reason


def run_suite(scale: SuiteScale, device: torch.device, work: Path, report: dict, out: Path) -> None:
    """Data, trainer, sweeps, compile; the JSON is rewritten after each, so that a run stopped at a
    time limit still leaves what it measured."""
    overrides = suite_overrides(scale, device, work)
    cfg = compose_train([*overrides, "model.freeze_backbone=false"])
    started = time.perf_counter()
    train = load_dataset(cfg.data).train  # generated, decoded and cached: the sweeps read the cache
    report["data_prep_s"] = time.perf_counter() - started
    print(f"data: {scale.train_images} + {scale.test_images} images generated and decoded at "
          f"{scale.image_size} px in {report['data_prep_s']:.1f} s", flush=True)
    suite_trainer(train, cfg, device, scale, report)
    save_json(report, out)
    if device.type == "cuda":  # the sweep jobs get the memory the trainer section held here
        gc.collect()
        torch.cuda.empty_cache()
    report["sweeps"] = {}
    for name, (jobs_per_gpu, _) in SUITE_SWEEPS.items():
        if jobs_per_gpu in scale.jobs_per_gpu:
            report["sweeps"][name] = suite_sweep(name, scale, overrides, device, work, report["skipped"])
        else:
            report["sweeps"][name] = dict.fromkeys(SWEEP_KEYS)
            timed_ks = " and ".join(map(str, scale.jobs_per_gpu))
            report["skipped"][f"sweeps.{name}"] = f"--quick times jobs_per_gpu {timed_ks} only"
        save_json(report, out)
    suite_compile(train, cfg, device, scale, report)


def gpu_suite(args: argparse.Namespace) -> dict:
    """The whole check into one JSON (every key of GPU_SUITE_KEYS); the path is printed."""
    started = time.perf_counter()
    device = pick_device(args.device)
    scale = QUICK if args.quick else FULL
    out = Path(args.out or "outputs/bench/gpu_suite.json")
    report = {"device": device_name(device), "torch": torch.__version__, "quick": args.quick,
              "scale": {**dataclasses.asdict(scale), "variants": head_variants()}, "skipped": {}}
    print(f"device: {report['device']}, torch {report['torch']}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cxr-gpu-suite-"))
    try:
        run_suite(scale, device, work, report, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["all_jobs_ok"] = all(sweep["jobs_ok"] == sweep["jobs"] for sweep in report["sweeps"].values()
                                if sweep["jobs"] is not None)
    report["total_s"] = time.perf_counter() - started
    save_json(report, out)
    print(f"{'all sweep jobs ok' if report['all_jobs_ok'] else 'FAILED sweep jobs'}; "
          f"{report['total_s']:.0f} s; written to {out}")
    return report


def save_json(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The cache build: speed, and peak memory against the number of images


def cache_build_child(folder: str, size: str, cache_dir: str, mode: str) -> None:
    """Run in a fresh process, so that its peak RSS is this build's alone: build the cache of
    folder/<class>/* (mode "mapped", as cxr trains) or decode the split into memory (mode
    "in_memory": decode_split, the way the cache was built before it was a memory map); print a
    JSON line of seconds and peak RSS (MB) of this process and of its decode workers."""
    items = list_files(Path(folder), find_classes(Path(folder)))
    # the imports (torch, hydra, ...) peak at several hundred MB: not the build's, so on Linux the
    # high-water mark is reset to the current RSS here (elsewhere it keeps the imports' peak)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    baseline_mb = _peak_rss_mb(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if mode == "mapped":
        split = load_split(items, int(size), Path(cache_dir), 0, "bench")
    else:
        split = decode_split(items, int(size), 0, "bench")
    build_s = time.perf_counter() - started
    figures = {"images": len(split), "build_s": build_s, "build_img_s": len(split) / build_s,
               "baseline_mb": baseline_mb, "peak_mb": _peak_rss_mb(resource.RUSAGE_SELF),
               "workers_peak_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN)}
    if mode == "mapped":
        started = time.perf_counter()
        split = load_split(items, int(size), Path(cache_dir), 0, "bench")  # served from the map
        figures["read_s"] = time.perf_counter() - started
    print(json.dumps(figures))


def _peak_rss_mb(who: int) -> float:
    """Peak RSS in MB of this process (VmHWM, which clear_refs resets) or of its waited children."""
    if who == resource.RUSAGE_SELF and Path("/proc/self/status").exists():
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)


def bench_cache(source: Path, counts: list[int], size: int, work: Path, compare: bool) -> dict:
    """Cache builds of `counts` images (links to the files of `source`) at `size` px, each in a
    fresh process: img/s and peak memory of the parent (above its RSS after the imports) and of the
    decode workers, which should not grow with the count; with `compare`, the in-memory decode as
    well, whose peak grows by count x size^2 bytes (twice that while it stacks). A forked worker's
    RSS counts the parent's pages it shares, so its peak is about the parent's baseline."""
    report = {"size": size, "counts": counts, "array_mb": {}, "mapped": {}, "in_memory": {}}
    for count in counts:
        folder = work / f"images-{count}"
        repeat_images(source, folder, count)
        report["array_mb"][count] = count * size * size / 2**20
        for mode in ("mapped", "in_memory") if compare else ("mapped",):
            command = [sys.executable, "-c", "import sys; from cxr.bench import cache_build_child; "
                       "cache_build_child(*sys.argv[1:])", str(folder), str(size), str(work / f"cache-{count}"), mode]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            figures["growth_mb"] = figures["peak_mb"] - figures["baseline_mb"]
            report[mode][count] = figures
            print(f"cache  {mode:9s} {count:6d} images @{size} px ({report['array_mb'][count]:.0f} MB uint8): "
                  f"{figures['build_img_s']:.0f} img/s, parent peak {figures['peak_mb']:.0f} MB "
                  f"(+{figures['growth_mb']:.0f} over its imports), workers peak "
                  f"{figures['workers_peak_mb']:.0f} MB" + (f", read back in {figures['read_s']:.2f} s"
                                                            if "read_s" in figures else ""), flush=True)
    return report


def scratch_suite(args: argparse.Namespace, name: str, measure: Callable[[argparse.Namespace, Path], dict]) -> dict:
    """One measurement alone, in a scratch folder removed afterwards; its report is saved to --out
    (default outputs/bench/<name>.json)."""
    work = Path(tempfile.mkdtemp(prefix=f"cxr-{name}-bench-"))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out or f"outputs/bench/{name}.json")
    save_json(report, out)
    print(f"written to {out}")
    return report


def cache_suite(args: argparse.Namespace, work: Path) -> dict:
    """--cache-suite: the cache build alone (bench_cache) on --images or generated ones."""
    source = args.images
    if source is None:
        source = work / "generated"
        generate_images(source, 4 if args.quick else 40)
    print(f"{os.cpu_count()} cores; images from {source}", flush=True)
    return bench_cache(source, args.cache_counts, args.size, work, compare=not args.no_compare)


NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")


def write_index_tables(root: Path, rows: int) -> None:
    """`rows` images as hard links to 8 small PNGs in the NIH layout (Data_Entry_2017.csv,
    test_list.txt, images_XXX/images/, 4 images per patient, 14 findings at 5% each), and the same
    as a generic CSV (path, findings joined by |, patient, split)."""
    rng = np.random.default_rng(0)
    seeds = [root / f"seed{k}.png" for k in range(8)]
    for path in seeds:
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    entries, generic = [], []
    for i in range(rows):
        patient, name = i // 4 + 1, f"{i // 4 + 1:08d}_{i % 4:03d}.png"
        relative = Path(f"images_{i // 10_000 + 1:03d}") / "images" / name
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(seeds[i % 8], root / relative)
        findings = "|".join(f for f in NIH_FINDINGS if rng.random() < 0.05) or "No Finding"
        entries.append([name, findings, i % 4, patient, 50, "M", "PA", 64, 64, 0.14, 0.14])
        generic.append([str(relative), findings, patient, "test" if patient % 5 == 0 else "train"])
    for path, header, table in (
            (root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                                            "Patient Age", "Patient Gender", "View Position", "OriginalImage[Width",
                                            "Height]", "OriginalImagePixelSpacing[x", "y]"], entries),
            (root / "generic.csv", ["Path", "Findings", "Patient", "Split"], generic)):
        with open(path, "w", newline="") as file:
            csv.writer(file).writerows([header, *table])
    (root / "test_list.txt").write_text("".join(f"{row[0]}\n" for row in entries if row[3] % 5 == 0))


def index_suite(args: argparse.Namespace, work: Path) -> dict:
    """--index-suite: indexing a large table alone (no decoding): data=nih and data=csv with the
    findings joined in one column, each --repeats times (median), and carving validation by patient."""
    write_index_tables(work, args.index_rows)
    layouts = {"nih": ["data=nih", f"data.root={work}"],
               "csv_findings": ["data=csv", f"data.csv={work / 'generic.csv'}", "data.label_column=Findings",
                                "data.label_separator='|'", "data.patient_column=Patient", "data.split_column=Split"]}
    report = {"rows": args.index_rows, "findings": len(NIH_FINDINGS)}
    for name, overrides in layouts.items():
        data_cfg = compose_train(overrides).data
        index = partial(LAYOUTS[data_cfg.layout], data_cfg)
        seconds = [timed(index, torch.device("cpu")) for _ in range(args.repeats)]
        report[f"{name}_s"] = statistics.median(seconds)
        print(f"index  {name:12s} {args.index_rows} rows: " + ", ".join(f"{t:.2f}" for t in seconds)
              + f" s (median {report[f'{name}_s']:.2f})", flush=True)
    listing = index()
    report["val_carve_s"] = timed(partial(split_by_patient, listing.items["train"], 0.1, 0, listing.patient_of),
                                  torch.device("cpu"))
    report["items"] = {split: len(items) for split, items in listing.items.items()}
    return report


# ---------------------------------------------------------------------------------------------
# The command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxr.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where the JSON goes (default: outputs/bench.json; with "
                        "--gpu-suite, outputs/bench/gpu_suite.json)")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="the GPU check instead: trainer img/s per precision, the seed-scale sweep "
                        "at 1, 2, 4 jobs per GPU and frozen, peak memory (see GPU_SUITE_KEYS)")
    parser.add_argument("--cache-suite", action="store_true",
                        help="the cache build alone: img/s and peak memory at each of --cache-counts "
                        "images of --size px, each in a fresh process")
    parser.add_argument("--index-suite", action="store_true",
                        help="indexing alone: --index-rows rows of a NIH-layout table and a generic CSV "
                        "(hard links, no decoding), data=nih and data=csv, median of --repeats")
    parser.add_argument("--index-rows", type=int, default=100_000, help="rows of --index-suite's tables")
    parser.add_argument("--cache-counts", type=lambda text: [int(n) for n in text.split(",")],
                        default=[2000, 8000], help="images per cache build (default: 2000,8000)")
    parser.add_argument("--no-compare", action="store_true",
                        help="with --cache-suite: skip the in-memory decode it is compared with")
    parser.add_argument("--images", type=Path, help="folder of <class>/ subfolders of images "
                        "(default: $CXR_SHARED_DATA/cxr-fullres, else generated ones)")
    parser.add_argument("--count", type=int, default=320, help="images per pass (files repeat)")
    parser.add_argument("--size", type=int, default=224, help="loader, frozen and GPU resolution")
    parser.add_argument("--train-size", type=int, default=64, help="resolution of bare vs trainer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure (median)")
    parser.add_argument("--train-steps", type=int, default=3, help="batches per train timing")
    parser.add_argument("--train-repeats", type=int, default=9, help="timings of each train loop")
    parser.add_argument("--head-epochs", type=int, default=20, help="epochs per head variant")
    parser.add_argument("--frozen-count", type=int, default=240, help="images of the frozen sweep")
    parser.add_argument("--gpu-images", type=int, default=4096, help="images per GPU epoch")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts and sizes (for tests; with --gpu-suite: minutes on a CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.size, args.train_size, args.batch_size = 24, 32, 32, 8
        args.repeats, args.head_epochs, args.frozen_count, args.gpu_images = 1, 1, 24, 64
        args.train_steps, args.train_repeats, args.cache_counts = 2, 1, [64, 128]
        args.index_rows = 2_000
    return args


def describe(device: torch.device, source: Path, items) -> dict:
    distinct = {os.path.realpath(path) for path, _ in items}
    megapixels = [w * h / 1e6 for w, h in map(_image_size, distinct)]
    print(f"device: {device_name(device)}; {len(items)} images ({len(megapixels)} distinct, "
          f"{np.mean(megapixels):.2f} Mpx mean) from {source}", flush=True)
    return {"device": device_name(device), "torch": torch.__version__,
            "cpu": {"cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
            "images": {"source": str(source), "count": len(items), "distinct": len(megapixels),
                       "mean_megapixels": float(np.mean(megapixels))}}


def compose_train(overrides: list[str]):
    """conf/train.yaml with `overrides`, as `python -m cxr.train` composes it."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def run_sections(args, device: torch.device, work: Path) -> dict:
    """Every section on the same images, each printed as it finishes."""
    cfg = compose_train(["model.weights=null", f"trainer.batch_size={args.batch_size}", f"data.cache_dir={work}"])
    shared = os.environ.get("CXR_SHARED_DATA")
    source = args.images or (Path(shared) / "cxr-fullres" if shared else None)
    if source is None:
        source = work / "generated"
        generate_images(source, 4 if args.quick else 40)
    items = repeat_images(source, work / "images", args.count)
    report = describe(device, source, items)

    report["loader"] = bench_loader(work / "images", items, args.size, args.batch_size, args.repeats, work)
    _print("loader", report["loader"], "naive_img_s", "cache_build_img_s", "cached_normalised_img_s")
    small = subset(items, args.train_steps * args.batch_size, seed=0)
    report["train"] = bench_train(load_split(small, args.train_size, work / "cache", 0, "bench"),
                                  cfg, device, args.train_repeats)
    _print("train", report["train"], "bare_img_s", "trainer_img_s")
    variants = head_variants()[:: 6 if args.quick else 1]  # quick: the first and the last
    report["frozen"] = bench_frozen(subset(items, args.frozen_count, seed=0), args.size, variants, cfg,
                                    args, device, work)
    _print("frozen", report["frozen"], "one_backbone_pass_s", "sweep_s", "per_job_beyond_one_pass_s")
    if device.type == "cuda":
        full = load_split(items, args.size, work / "cache", 0, "bench")
        report["gpu"] = bench_gpu(full, cfg, device, args.repeats, args.gpu_images)
        _print("gpu", report["gpu"], "trainer_img_s", "busy_fraction")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True  # fixed shapes, as the trainer runs them
    if args.gpu_suite:
        return gpu_suite(args)
    if args.cache_suite:
        return scratch_suite(args, "cache", cache_suite)
    if args.index_suite:
        return scratch_suite(args, "index", index_suite)
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        report = run_sections(args, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = {
        # normalised float batches on both sides: what the trainer gets from either loader
        "loader.cached >= 20x naive": report["loader"]["cached_normalised_vs_naive"] >= 20,
        "loader.cache_build >= 2x naive": report["loader"]["cache_build_vs_naive"] >= 2,
        "train.trainer >= 0.9x bare": report["train"]["trainer_vs_bare"] >= 0.9,
        "frozen.every job of the sweep ok": report["frozen"]["jobs_ok"] == len(report["frozen"]["variants"]),
    }
    if "gpu" in report:
        targets["gpu.trainer >= 2500 img/s"] = report["gpu"]["trainer_img_s"] >= 2500
    report["targets"] = targets
    out = Path(args.out or "outputs/bench.json")
    save_json(report, out)
    for target, ok in report["targets"].items():
        print(f"{'ok  ' if ok else 'MISS'} {target}")
    print(f"written to {out}")
    return report


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _print(section: str, figures: dict, *keys: str) -> None:
    shown = "  |  ".join(f"{k} {figures[k]:.4g}" for k in keys)
    ratios = "".join(f"  {k} {v:.2f}x" for k, v in figures.items() if "_vs_" in k)
    print(f"{section:7s}@{figures['size']} px  {shown}{ratios}", flush=True)


if __name__ == "__main__":
    # the GPU check's exit status says whether every sweep job ended ok
    sys.exit(0 if main().get("all_jobs_ok", True) else 1)

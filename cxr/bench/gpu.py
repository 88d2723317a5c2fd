"""`python -m cxr.bench gpu`: the GPU check, the one script to run where a GPU is lent
(docs/gpu-check.md has the command for a host without a network, the time per section and how to
read the JSON).

In order, each section only if its estimate fits in what is left of --budget-s (cxr.bench.gpu_plan):
data (the seed-scale image set generated over every core, then decoded once into the cache the
sweeps read), trainer (the real trainer's img/s at 224 px in tf32, bf16 and bf16 + channels_last,
and the GPU's busy fraction), the seven variants as real `hydra/launcher=per_gpu` sweeps at 1, 2
and 4 jobs per GPU and on the frozen-backbone path (wall time, the GPU's busy fraction, each job's
peak memory and, for a failed job, its error line), and last torch.compile. The JSON holds every
key from the start (null until measured; `skipped` says why one stays null) and is rewritten
after every section, so a run killed at its time limit still leaves what it measured. When a job
or a section failed, the work folder with the jobs' logs is kept and named in the JSON.
"""

import argparse
import dataclasses
import gc
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr import results
from cxr.bench.gpu_plan import SECTIONS, SWEEPS, Rates, Scale, estimate_s, over_budget, priors, with_sweep, with_trainer
from cxr.bench.images import generate_images
from cxr.bench.options import Work, add_common, work_folder
from cxr.bench.runs import (
    STOP_GRACE_S,
    compose_train,
    head_variants,
    job_errors,
    run_sweep,
    sized,
    sweep_jobs,
    trainer_epoch,
)
from cxr.bench.timing import NO_CUDA, BusySampler, busy_fraction, machine, save_json, side_by_side, timed
from cxr.data import Dataset, load_dataset
from cxr.runtime import pick_device

HELP = "the GPU check: trainer img/s per precision, the seed-scale sweep packed 1/2/4 per GPU and frozen, in --budget-s"
_VARIANTS = tuple(head_variants())
FULL = Scale(224, 5216, 624, 32, 2048, 3, 2, 20, (1, 2, 4), _VARIANTS)
QUICK = Scale(32, 48, 16, 8, 8, 1, 1, 2, (1, 2), (_VARIANTS[0], _VARIANTS[-1]))
GENERATED_HEIGHTS = (160, 640)  # the embedded dataset's sizes: cheap to draw, still decoded down to 224 px
# the trainer's precision variants: name -> (trainer.amp, trainer.channels_last, torch.compile). tf32:
# autocast off, which on a GPU still runs cuDNN convolutions in TF32 (torch 2.14's default
# cudnn.conv.fp32_precision), while matmuls stay full fp32
TRAINER_VARIANTS = {"tf32": ("off", False, False), "bf16": ("bf16", False, False),
                    "bf16_channels_last": ("bf16", True, False), "compile": ("bf16", True, True)}
SWEEP_KEYS = ("jobs_per_gpu", "freeze_backbone", "epochs", "jobs", "jobs_ok", "errors", "sweep_s", "train_s",
              "gpu_busy_fraction", "gpu_memory_mb")
# every key of the JSON, on any device (dotted paths): a value that could not be measured is null,
# and `skipped` holds why under its path or a prefix of it
GPU_SUITE_KEYS = ("device", "torch", "quick", "scale", "data_prep_s",
                  *(f"trainer_img_s.{name}" for name in TRAINER_VARIANTS), "compile_s", "busy_fraction",
                  *(f"sweeps.{name}.{key}" for name in SWEEPS for key in SWEEP_KEYS),
                  "all_jobs_ok", "failed_sections", "skipped", "budget.budget_s", "budget.estimated_s",
                  "budget.section_s", "budget.skipped_sections", "work_dir", "total_s")
# the keys a section fills: where `skipped` says why, when it does not run
SECTION_KEYS = {"data": ("data_prep_s",),
                "trainer": ("trainer_img_s.tf32", "trainer_img_s.bf16", "trainer_img_s.bf16_channels_last",
                            "busy_fraction"),
                **{name: (f"sweeps.{name}",) for name in SWEEPS},
                "compile": ("compile_s", "trainer_img_s.compile")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget-s", type=float, default=480,
                        help="total seconds: a section whose estimate does not fit in what is left is skipped "
                        "(default 480)")
    add_common(parser, "gpu", "every section at toy size (two variants): minutes on a CPU, to try the check "
               "before a GPU is spent on it")


@dataclass
class Check:
    """One run of the check: what it runs on and at what scale, what it measured so far."""

    scale: Scale
    device: torch.device
    work: Work
    out: Path
    budget_s: float
    report: dict
    rates: Rates
    started: float
    dataset: Dataset | None = None

    @property
    def overrides(self) -> list[str]:
        """What every run of the check changes in conf/train.yaml: the generated Kaggle layout at the
        check's scale (decoded once into work/cache, which every sweep job reads), random init (a
        bare GPU host has no network for ImageNet weights)."""
        work, scale = self.work.path, self.scale
        return ["data=chest_xray", f"data.root={work / 'kaggle'}", f"data.image_size={scale.image_size}",
                f"data.cache_dir={work / 'cache'}", "model.weights=null", f"trainer.batch_size={scale.batch_size}",
                f"trainer.device={self.device}", "trainer.progress=false"]

    def variant_cfg(self, name: str):
        amp, channels_last, _ = TRAINER_VARIANTS[name]
        return compose_train([*self.overrides, "model.freeze_backbone=false", f"trainer.amp={amp}",
                              f"trainer.channels_last={str(channels_last).lower()}"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        self.report["total_s"] = self.elapsed()
        save_json(self.report, self.out)


def new_report(scale: Scale, device: torch.device, budget_s: float, quick: bool) -> dict:
    """Every key of GPU_SUITE_KEYS, null until measured."""
    return {**machine(device), "quick": quick, "scale": dataclasses.asdict(scale), "data_prep_s": None,
            "trainer_img_s": dict.fromkeys(TRAINER_VARIANTS), "compile_s": None, "busy_fraction": None,
            "sweeps": {name: dict.fromkeys(SWEEP_KEYS) for name in SWEEPS}, "all_jobs_ok": None,
            "failed_sections": {}, "skipped": {},
            "budget": {"budget_s": budget_s, "estimated_s": {}, "section_s": {}, "skipped_sections": []},
            "work_dir": None, "total_s": None}


def precondition(check: Check, section: str) -> str | None:
    """Why `section` cannot run here whatever the budget, or None."""
    if section != "data" and check.dataset is None:
        return "needs the data section, which did not run"
    if section in SWEEPS and SWEEPS[section][0] not in check.scale.jobs_per_gpu:
        return f"--quick times jobs_per_gpu {' and '.join(map(str, check.scale.jobs_per_gpu))} only"
    if section == "compile" and check.device.type != "cuda":
        return f"{NO_CUDA}: torch.compile is timed on a GPU only (the trainer it speeds up there)"
    return None


def attempt(check: Check, section: str, run: Callable[[Check], None]) -> None:
    """`run` the section if it can run and its estimate fits in the budget, else say why not; a
    section that fails is recorded with its error line and the check goes on. The JSON is saved."""
    report = check.report
    estimate = estimate_s(section, check.scale, check.rates, os.cpu_count() or 1)
    report["budget"]["estimated_s"][section] = round(estimate, 1)
    reason = precondition(check, section) or over_budget(estimate, check.elapsed(), check.budget_s)
    if reason is None:
        started = time.perf_counter()
        try:
            run(check)
        except Exception as error:  # the check's finding, not its end: the next sections still run
            traceback.print_exc()
            reason = report["failed_sections"][section] = f"{type(error).__name__}: {error}".splitlines()[0]
        report["budget"]["section_s"][section] = round(time.perf_counter() - started, 1)
    else:
        report["budget"]["skipped_sections"].append(section)
        print(f"{section}: skipped ({reason})", flush=True)
    if reason is not None:
        report["skipped"].update(dict.fromkeys(SECTION_KEYS[section], reason))
    check.save()


def data_section(check: Check) -> None:
    """The Kaggle layout at the check's scale, generated over every core, then decoded once."""
    started, root, scale = time.perf_counter(), check.work.path / "kaggle", check.scale
    generate_images(root / "train", scale.train_images, GENERATED_HEIGHTS)
    generate_images(root / "test", scale.test_images, GENERATED_HEIGHTS, first=scale.train_images)
    check.dataset = load_dataset(check.variant_cfg("tf32").data)  # decoded into the cache the sweeps read
    check.report["data_prep_s"] = time.perf_counter() - started
    print(f"data: {scale.train_images} + {scale.test_images} images generated and decoded at "
          f"{scale.image_size} px in {check.report['data_prep_s']:.1f} s", flush=True)


def trainer_section(check: Check) -> None:
    """img/s of the real trainer's epoch in tf32, bf16 and bf16 + channels_last, side by side, and
    the GPU's busy fraction in the last (the trainer's default on CUDA)."""
    report, device = check.report, check.device
    split = sized(check.dataset.train, check.scale.trainer_images)
    epochs = {name: trainer_epoch(check.variant_cfg(name), split, check.dataset.classes)
              for name in ("tf32", "bf16", "bf16_channels_last")}
    for epoch in epochs.values():
        epoch()  # warm-up: cudnn.benchmark tries its kernels on the first batches
    timings = side_by_side(epochs, check.scale.repeats, device)
    report["trainer_img_s"].update({name: figures["img_s"] for name, figures in timings.items()})
    if device.type == "cuda":
        report["busy_fraction"] = busy_fraction(epochs["bf16_channels_last"], device)
    else:
        report["skipped"]["busy_fraction"] = f"{NO_CUDA}: the share of wall time a GPU runs kernels"
    default = "bf16_channels_last" if device.type == "cuda" else "tf32"  # what the sweeps train in here
    check.rates = with_trainer(check.rates, report["trainer_img_s"][default], check.scale.image_size)
    shown = "  ".join(f"{name} {value:.4g}" for name, value in report["trainer_img_s"].items() if value)
    print(f"trainer img/s @{check.scale.image_size} px  {shown}  busy fraction {report['busy_fraction']}", flush=True)


def sweep_section(check: Check, name: str) -> None:
    """The variants as the real multirun on the per_gpu launcher (`jobs_per_gpu` side by side on
    each GPU; on a CPU, side by side on it), stopped when the budget runs out: its wall time, the
    GPU's busy fraction meanwhile, and from each job's result.json its peak GPU memory, or its
    error line."""
    jobs_per_gpu, frozen = SWEEPS[name]
    scale, skipped = check.scale, check.report["skipped"]
    epochs = scale.frozen_epochs if frozen else scale.sweep_epochs
    free_gpu_memory(check.device)  # the sweep's jobs get the memory this process held
    with BusySampler(check.device) as busy:
        seconds, stopped = run_sweep([f"experiment={','.join(scale.variants)}", "hydra/launcher=per_gpu",
                                      f"jobs_per_gpu={jobs_per_gpu}", f"model.freeze_backbone={str(frozen).lower()}",
                                      f"trainer.epochs={epochs}", *check.overrides], check.work.path / f"sweep-{name}",
                                     timeout_s=max(1.0, check.budget_s - check.elapsed() - STOP_GRACE_S))
    jobs = sweep_jobs(check.work.path / f"sweep-{name}")
    records = [record or {} for _, record in jobs]
    # each job's {peak_allocated, peak_reserved, cuda_context_estimate} (MiB): packing must fit the
    # reserved peak plus the context (null for packed jobs: take it from the jobs_per_gpu_1 sweep)
    peaks = [record.get("gpu_memory_mb") for record in records]
    figures = check.report["sweeps"][name] = {
        "jobs_per_gpu": jobs_per_gpu, "freeze_backbone": frozen, "epochs": epochs, "jobs": len(scale.variants),
        "jobs_ok": sum(record.get("status") == results.OK for record in records),
        "errors": job_errors(jobs, len(scale.variants)) | ({"(sweep)": stopped} if stopped else {}),
        "sweep_s": seconds, "train_s": sum((record.get("time") or {}).get("train_ms", 0) for record in records) / 1000,
        "gpu_busy_fraction": busy.mean, "gpu_memory_mb": peaks if any(p is not None for p in peaks) else None}
    if busy.reason:
        skipped[f"sweeps.{name}.gpu_busy_fraction"] = busy.reason
    if figures["gpu_memory_mb"] is None:
        skipped[f"sweeps.{name}.gpu_memory_mb"] = NO_CUDA if check.device.type != "cuda" else "no job recorded it"
    if not frozen and figures["jobs_ok"] == figures["jobs"]:
        check.rates = with_sweep(check.rates, seconds, figures["train_s"], figures["jobs"], jobs_per_gpu)
    print(f"sweep {name:15s} {figures['jobs_ok']}/{figures['jobs']} ok  {seconds:.1f} s (train "
          f"{figures['train_s']:.1f} s, {epochs} epochs)  busy {busy.mean}  GPU MiB {peaks}", flush=True)
    for job, error in figures["errors"].items():
        print(f"  {job}: {error}", flush=True)


def compile_section(check: Check) -> None:
    """The bf16 channels_last trainer under torch.compile: its first epoch (compilation included)
    and the median img/s of the next. Last, being the slowest section and the likeliest to fail."""
    split = sized(check.dataset.train, check.scale.trainer_images)
    epoch = trainer_epoch(check.variant_cfg("compile"), split, check.dataset.classes, compile_model=True)
    compile_s = timed(epoch, check.device)
    img_s = side_by_side({"compile": epoch}, check.scale.repeats, check.device)["compile"]["img_s"]
    check.report["compile_s"], check.report["trainer_img_s"]["compile"] = compile_s, img_s
    print(f"compile: first epoch {compile_s:.1f} s, then {img_s:.4g} img/s", flush=True)


def free_gpu_memory(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


SECTION_RUNS = {"data": data_section, "trainer": trainer_section, "compile": compile_section,
                **{name: (lambda check, name=name: sweep_section(check, name)) for name in SWEEPS}}


def run(args: argparse.Namespace) -> dict:
    """The whole check into one JSON (every key of GPU_SUITE_KEYS); the path is printed."""
    started = time.perf_counter()
    scale, device = QUICK if args.quick else FULL, pick_device(args.device)
    report = new_report(scale, device, args.budget_s, args.quick)
    print(f"device: {report['device']}, torch {report['torch']}, budget {args.budget_s:g} s", flush=True)
    with work_folder(args.work, "gpu") as work:
        check = Check(scale, device, work, args.out, args.budget_s, report, priors(device.type), started)
        for variant in scale.variants:  # every job's config checked before any work
            compose_train([f"experiment={variant}", *check.overrides])
        for section in SECTIONS:
            attempt(check, section, SECTION_RUNS[section])
        ran = [sweep for sweep in report["sweeps"].values() if sweep["jobs"] is not None]
        report["all_jobs_ok"] = all(not sweep["errors"] for sweep in ran)
        work.kept = work.kept or not report["all_jobs_ok"] or bool(report["failed_sections"])
        report["work_dir"] = str(work.path) if work.kept else None
        check.save()
    print(f"{'all sweep jobs ok' if report['all_jobs_ok'] else 'FAILED sweep jobs'}"
          f"{'; failed sections: ' + ', '.join(report['failed_sections']) if report['failed_sections'] else ''}; "
          f"{report['total_s']:.0f} s; written to {args.out}"
          + (f"; the jobs' logs are in {report['work_dir']}" if report["work_dir"] else ""), flush=True)
    return report

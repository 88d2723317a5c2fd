"""What the GPU check runs, and how long each of its sections should take.

A GPU host is often lent for one short slot, so the check has a total time budget (--budget-s): a
section runs only if its estimate fits in what is left, and the estimates improve as sections
finish (the trainer's measured img/s replaces the prior, a full-network sweep's measured per-job
overhead replaces that prior). Everything here is a pure function of numbers, so that CPU tests
check it with an H100's figures.
"""

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scale:
    """How much the GPU check runs. FULL is the seed's data scale (5,216 train and 624 test images
    at 224 px, seven variants): the full-network sweeps run 2 of the seed's 20 epochs (a job's time
    beyond them is per-job cost, the same at 20), the frozen-backbone sweep all 20 (its heads train
    in seconds). QUICK runs every section at toy size on a CPU, so that the check is known to work
    before a GPU is spent on it."""

    image_size: int
    train_images: int  # generated; validation is carved out of them by patient (10%), as from Kaggle's
    test_images: int
    batch_size: int
    trainer_images: int  # per timed trainer epoch; a multiple of batch_size: torch.compile sees one shape
    repeats: int  # timed epochs per trainer variant (their median counts)
    sweep_epochs: int
    frozen_epochs: int
    jobs_per_gpu: tuple[int, ...]
    variants: tuple[str, ...]  # experiments, one sweep job each


# the timed sweeps: name -> (jobs_per_gpu, model.freeze_backbone)
SWEEPS = {"jobs_per_gpu_1": (1, False), "jobs_per_gpu_2": (2, False), "jobs_per_gpu_4": (4, False),
          "frozen": (1, True)}
# in the order they run: what the closing note of a GPU run needs most comes first
SECTIONS = ("data", "trainer", *SWEEPS, "compile")


@dataclass(frozen=True)
class Rates:
    """What the estimates go by: priors per device type, replaced by measurements."""

    img_s_224: float  # the trainer's img/s at 224 px (other sizes: scaled by their pixel count)
    build_s: float  # building a trainer in this process (model, optimizer) and its first epoch's extra
    job_overhead_s: float  # a sweep job's seconds beyond its training: process start, loading, test, report
    compile_s: float  # torch.compile's first epoch, beyond a plain one
    image_s: float  # generating and decoding one image, on one core


# conservative: an H100 trains a ResNet50 at 224 px at 2,500+ img/s in bf16; fp32 near 800
PRIORS = {"cuda": Rates(img_s_224=800.0, build_s=5.0, job_overhead_s=30.0, compile_s=120.0, image_s=0.05),
          "cpu": Rates(img_s_224=3.0, build_s=5.0, job_overhead_s=20.0, compile_s=120.0, image_s=0.05)}


def priors(device_type: str) -> Rates:
    return PRIORS.get(device_type, PRIORS["cpu"])


def estimate_s(section: str, scale: Scale, rates: Rates, cores: int) -> float:
    """Seconds the section should take at `scale` with `rates`."""
    img_s = rates.img_s_224 * (224 / scale.image_size) ** 2
    images, jobs = scale.train_images + scale.test_images, len(scale.variants)
    if section == "data":
        return images * rates.image_s / cores
    if section == "trainer":  # three precisions, each built, warmed up, timed; one more epoch profiled
        return 3 * rates.build_s + (3 * (scale.repeats + 1) + 1) * scale.trainer_images / img_s
    if section == "compile":
        return rates.build_s + rates.compile_s + scale.repeats * scale.trainer_images / img_s
    jobs_per_gpu, frozen = SWEEPS[section]
    # an epoch costs about one training pass over every image (train, plus evaluating val and test);
    # frozen: one backbone pass (forward only, a third of a step) and heads that train in seconds.
    # Packed jobs share the GPU's compute, so only their overheads are counted side by side.
    training = images / img_s / 3 if frozen else jobs * scale.sweep_epochs * images / img_s
    return training + math.ceil(jobs / jobs_per_gpu) * rates.job_overhead_s


def over_budget(estimate: float, elapsed_s: float, budget_s: float) -> str | None:
    """None when a section estimated at `estimate` seconds fits in what is left, else why not."""
    left = budget_s - elapsed_s
    if estimate <= left:
        return None
    return f"over budget: estimated {estimate:.0f} s, {max(0.0, left):.0f} s of --budget-s {budget_s:g} left"


def with_trainer(rates: Rates, img_s: float, image_size: int) -> Rates:
    """The rates after the trainer section measured `img_s` at `image_size` px."""
    return replace(rates, img_s_224=img_s * (image_size / 224) ** 2)


def with_sweep(rates: Rates, sweep_s: float, train_s: float, jobs: int, jobs_per_gpu: int) -> Rates:
    """The rates after a full-network sweep: its jobs' training seconds (summed over jobs, shared
    by `jobs_per_gpu` at a time) set aside, the rest is per-job overhead, `jobs_per_gpu` at a time."""
    overhead = (sweep_s - train_s / jobs_per_gpu) / math.ceil(jobs / jobs_per_gpu)
    return replace(rates, job_overhead_s=max(0.0, overhead))

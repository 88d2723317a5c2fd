"""Where a job's splits live while it trains on a GPU: planned before anything is copied.

Packed sweep jobs (`jobs_per_gpu` > 1) share a GPU, each capped at an equal part of its memory
(cxr.runtime). `plan_memory` is the pure decision, so CPU tests cover it with the numbers of real
datasets and GPUs; `place` applies it:

- A split that fits the job's part is copied to the GPU whole: a batch is then an index into it.
- A split that does not stays on the host (its cache file's map) and each batch is copied to the
  GPU when it is sliced, through pinned memory and asynchronously (cxr.batches), so the copy of one
  batch overlaps the GPU's work on the one before.
- Frozen-backbone features are kept in float32 when they all fit that way (no cast per batch), else
  in float16 as cached (each batch cast to float32 on the GPU: no value changes). The decoded
  images of a frozen run never go to the GPU whole: the backbone reads them batch by batch once,
  and the head then reads features only.

On the CPU nothing moves: the splits are the cache files' maps, read a batch at a time.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cxr.data.layouts import SPLITS
from cxr.decoding import Split
from cxr.runtime import MEMORY_SHARE

log = logging.getLogger(__name__)

DEVICE, HOST = "device", "pinned host"
# What a job holds on its GPU besides its splits: the CUDA context, cuDNN/cuBLAS workspaces, the
# model with its gradients and optimizer state (ResNet50 with Adam: ~0.4 GB) and the allocator's
# slack. An estimate, not a measurement: the GPU check reports what jobs really peaked at.
BASE_RESERVE = 2 << 30
# Activations a training step keeps for its backward pass, per input pixel of a batch: ResNet50 in
# fp32 keeps ~100 MB an image at 224 px (~2 KB a pixel); autocast keeps less.
TRAIN_BYTES_PER_PIXEL = 2 << 10


@dataclass(frozen=True)
class MemoryPlan:
    placements: tuple[str, ...]  # per split: DEVICE (whole on the GPU) or HOST (batches copied)
    features_dtype: torch.dtype | None  # of frozen-backbone features on the GPU; None for images


def plan_memory(split_bytes: Sequence[int], gpu_bytes: int, jobs_per_gpu: int, reserve_bytes: int,
                features: bool = False) -> MemoryPlan:
    """Where each split goes, given its size as cached (uint8 images, or with `features` float16
    features), the GPU's memory, the jobs sharing it and what a job holds besides its splits.

    A job may use MEMORY_SHARE / jobs_per_gpu of the GPU, less `reserve_bytes`. Splits take the
    device in order (train first: it is read most) while they fit in what is left; a split that
    does not stays on the host.
    """
    budget = gpu_bytes * MEMORY_SHARE / jobs_per_gpu - reserve_bytes
    sizes, dtype = list(split_bytes), None
    if features:
        dtype = torch.float32 if 2 * sum(sizes) <= budget else torch.float16
        sizes = [size * (dtype.itemsize // 2) for size in sizes]
    placements = []
    for size in sizes:
        fits = size <= budget
        placements.append(DEVICE if fits else HOST)
        budget -= size if fits else 0
    return MemoryPlan(tuple(placements), dtype)


def reserve_bytes(cfg) -> int:
    """What a job of this config holds on its GPU besides its splits (an estimate)."""
    if cfg.model.freeze_backbone:  # the head's batches are tiny; extraction is over before placing
        return BASE_RESERVE
    return BASE_RESERVE + cfg.trainer.batch_size * cfg.data.image_size ** 2 * TRAIN_BYTES_PER_PIXEL


def place(splits: Sequence[Split], device: torch.device, cfg) -> list[Split]:
    """The splits (images, or float16 features with model.freeze_backbone) as the run reads them on
    `device`: on the CPU as they are; on a CUDA GPU as the job's memory plan says; on another
    accelerator (MPS: memory shared with the host) whole, features in float32."""
    features = cfg.model.freeze_backbone
    if device.type == "cpu":
        return list(splits)
    if device.type != "cuda":
        return [split.to(device, dtype=torch.float32 if features else None) for split in splits]
    sizes = [split.images.nelement() * split.images.element_size() for split in splits]
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    plan = plan_memory(sizes, gpu_bytes, cfg.jobs_per_gpu, reserve_bytes(cfg), features)
    where = [f"{name} on the {placement}" for name, placement in zip(SPLITS, plan.placements, strict=True)]
    log.info("memory plan (%d job(s) on a %.1f GB GPU): %s%s", cfg.jobs_per_gpu, gpu_bytes / 1e9, ", ".join(where),
             f"; features as {plan.features_dtype}" if features else "")
    return [split.to(device, host=placement == HOST, dtype=plan.features_dtype)
            for split, placement in zip(splits, plan.placements, strict=True)]

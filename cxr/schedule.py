"""The learning rate over a run: optimizer.lr times a factor of the optimizer step.

One LambdaLR for every schedule (`none` is a factor of 1 after the warmup), stepped after each
optimizer step, so warmup and decay do not depend on how many batches an epoch has; its state
(the step count) is saved in last.pt, and a resumed run goes on with the same rates. The factor
applies to every parameter group alike: the backbone keeps its lr x optimizer.backbone_lr_scale.
"""

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def _cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_scale: float, **_) -> float:
    """From 1 at the end of the warmup towards min_lr_scale at `total_steps`."""
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_scale + (1 - min_lr_scale) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _step(step: int, *, steps_per_epoch: int, step_epochs: int, gamma: float, **_) -> float:
    """gamma times smaller every step_epochs epochs."""
    return gamma ** (step // (step_epochs * steps_per_epoch))


# scheduler.name -> the factor after the warmup (config validation reads the names from here too)
SCHEDULES = {"none": lambda step, **_: 1.0, "cosine": _cosine, "step": _step}


def lr_factor(step: int, *, name: str, warmup_steps: int, total_steps: int, steps_per_epoch: int,
              min_lr_scale: float, step_epochs: int, gamma: float) -> float:
    """The factor of optimizer.lr for optimizer step `step` (0: the first step of the run).

    Warmup rises linearly to just below 1 ((step + 1) / (warmup + 1)), so the first step after it
    is the first at the full rate; then the schedule `name` of SCHEDULES.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return SCHEDULES[name](step, warmup_steps=warmup_steps, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           min_lr_scale=min_lr_scale, step_epochs=step_epochs, gamma=gamma)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """The configured schedule over `epochs` epochs of `steps_per_epoch` optimizer steps."""
    factor = partial(lr_factor, name=cfg.name, warmup_steps=cfg.warmup_steps,
                     total_steps=steps_per_epoch * epochs, steps_per_epoch=steps_per_epoch,
                     min_lr_scale=cfg.min_lr_scale, step_epochs=cfg.step_epochs, gamma=cfg.gamma)
    return LambdaLR(optimizer, factor)


def scheduled_lr(scheduler: LambdaLR, step: int) -> float:
    """The first parameter group's lr at optimizer step `step` (0-based), as the schedule sets it."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)


def optimizer_steps(micro_steps: int, accumulate_steps: int) -> int:
    """Optimizer steps of an epoch of `micro_steps` batches: the last group may be short."""
    return math.ceil(micro_steps / accumulate_steps)

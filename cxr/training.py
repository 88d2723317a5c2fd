"""What a run trains, built once from its config: the model on its device, what it reads (images,
or a frozen backbone's cached features), its optimizer, learning-rate schedule and loss weights,
and one epoch of it.

cxr.train and cxr.bench both build their runs here, so a benchmark times exactly what the trainer
runs (scheduler, gradient accumulation and `pos_weight` included) and cannot drift from it.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cxr.batches import epoch_augment
from cxr.decoding import Split
from cxr.engine import train_one_epoch
from cxr.features import TrainingView, training_view
from cxr.model import Classifier, build_model, build_optimizer
from cxr.runtime import Runtime
from cxr.schedule import build_scheduler, optimizer_steps
from cxr.task import Task


def micro_steps(images: int, world: int, batch_size: int) -> int:
    """Batches per epoch of each rank (DistributedSampler gives each an equal share)."""
    return math.ceil(math.ceil(images / world) / batch_size)


@dataclass
class Training:
    """The parts of a run that train, and how one epoch of them runs."""

    task: Task
    model: Classifier  # the whole classifier: checkpoints and Grad-CAM see it
    view: TrainingView  # what trains (the model, or its head on frozen features) and what it reads
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    pos_weight: torch.Tensor | None  # multi-label trainer.pos_weight=balanced, else None
    micro_steps: int  # batches per epoch of each rank
    epoch_steps: int  # optimizer steps per epoch (fewer than micro_steps with accumulation)

    def train_epoch(self, module, epoch: int, cfg, runtime: Runtime, progress: bool = False,
                    should_stop: Callable[[], bool] = lambda: False) -> dict:
        """One epoch of `module` (view.module, or it wrapped by DDP / torch.compile): train_one_epoch's
        {"loss", "acc", "lrs"}."""
        trainer = cfg.trainer
        augment = epoch_augment(cfg.data.augment, cfg.data.hflip, cfg.seed, epoch, runtime.device)
        batches = self.view.train_inputs(trainer.batch_size, epoch, cfg.seed, augment, runtime.rank, runtime.world)
        return train_one_epoch(
            module, self.optimizer, batches, self.task, device=runtime.device, epoch=epoch, amp_dtype=runtime.amp_dtype,
            scaler=runtime.scaler, grad_clip=trainer.grad_clip, log_every=trainer.log_every, total=self.micro_steps,
            progress=progress, should_stop=should_stop, scheduler=self.scheduler,
            accumulate_steps=trainer.accumulate_steps, pos_weight=self.pos_weight)


def build_training(cfg, splits: Sequence[Split], task: Task, runtime: Runtime) -> Training:
    """The model for `task` on the runtime's device, trained on `splits` (train, val, test, as
    decoded: the view places what it reads for the device) as `cfg` says."""
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = build_model(cfg.model, cfg.data.image_size, task.outputs, init_seed=cfg.seed)
    model = model.to(runtime.device, memory_format=memory_format)
    view = training_view(model, splits, cfg, runtime.device, runtime.amp_dtype)
    optimizer = build_optimizer(view.module, cfg.optimizer)
    steps = micro_steps(len(view.train), runtime.world, cfg.trainer.batch_size)
    epoch_steps = optimizer_steps(steps, cfg.trainer.accumulate_steps)
    scheduler = build_scheduler(optimizer, cfg.scheduler, epoch_steps, cfg.trainer.epochs)
    pos_weight = task.pos_weight(splits[0].labels.to(runtime.device), cfg.trainer.pos_weight)
    return Training(task, model, view, optimizer, scheduler, pos_weight, steps, epoch_steps)

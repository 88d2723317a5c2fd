"""One training epoch and one evaluation pass: plain functions, nothing Hydra-specific.

Losses and correct counts are summed on the device and read once per logging interval, so the
GPU never waits for the host inside the step.
"""

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cxr.task import Task


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops at once, naming the epoch and step."""


# trainer.monitor -> its sign: +1 where higher is better, -1 where lower is (the validation's names too)
MONITORS = {"val/auroc": 1.0, "val/acc": 1.0, "val/balanced_acc": 1.0, "val/loss": -1.0}


@dataclass
class TrainingState:
    """What the epoch loop carries from one epoch to the next (last.pt holds it)."""

    epoch: int = 0  # the last finished epoch
    best_score: float = -math.inf  # trainer.monitor of the best epoch, signed: higher is better
    best_epoch: int | None = None
    threshold: float | None = None  # chosen on validation in the last finished epoch
    history: list[dict] = field(default_factory=list)
    train_ms: float = 0.0
    stopped_epoch: int | None = None  # set when trainer.patience ended the run early

    def patience_spent(self, patience: int | None) -> bool:
        """trainer.monitor has not improved for `patience` epochs since the best one."""
        return patience is not None and self.best_epoch is not None and self.epoch - self.best_epoch >= patience

    def advance(self, row: dict, score: float, threshold: float, train_ms: float) -> bool:
        """Record a finished epoch; whether it is the best so far.

        The first epoch always counts, so an undefined metric (AUROC on a one-class validation
        split) still leaves a checkpoint to test; later epochs must beat a real number.
        """
        self.epoch, self.threshold = row["epoch"], threshold
        self.history.append(row)
        self.train_ms += train_ms
        improved = self.best_epoch is None or (not math.isnan(score) and score > self.best_score)
        if improved:
            self.best_score, self.best_epoch = (-math.inf if math.isnan(score) else score), self.epoch
        return improved


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(model, optimizer, batches: Iterable, task: Task, *, device: torch.device, epoch: int,
                    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    grad_clip: float | None = None, log_every: int = 10, total: int | None = None,
                    progress: bool = True, should_stop=lambda: False, scheduler=None,
                    accumulate_steps: int = 1, pos_weight: torch.Tensor | None = None) -> dict:
    """Train on every (inputs, labels) batch once: {"loss", "acc"} averaged over images (multi-label:
    known entries), all ranks, and "lrs", the first parameter group's lr of each optimizer step.

    With accumulate_steps=k the gradients of k batches are summed, each loss divided by the
    number of batches in its group (k, or fewer in the epoch's last group, which `total` tells),
    so k batches of b images step as one batch of k x b would. The scheduler steps after each
    optimizer step.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)  # images, or known multi-label entries: no host sync
    step = 0
    lrs: list[float] = []
    pending: list[torch.Tensor] = []  # losses since the last check, kept on the device
    # disable=None: a bar only on a terminal; a log file gets the epoch's one line (cxr.train)
    bar = tqdm(batches, total=total, desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=None if progress else True)
    optimizer.zero_grad(set_to_none=True)  # set_to_none frees the gradient memory
    for step, (x, labels) in enumerate(bar, start=1):
        group_end = min(total or math.inf, math.ceil(step / accumulate_steps) * accumulate_steps)
        group_size = group_end - (math.ceil(step / accumulate_steps) - 1) * accumulate_steps
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = task.loss(logits, labels, pos_weight)
        backward(loss / group_size, scaler)
        if step == group_end or should_stop():
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer_step(model, optimizer, scaler, grad_clip)
            if scheduler is not None:
                scheduler.step()
        right, counted = task.correct(logits.detach(), labels)
        loss_sum += loss.detach() * counted
        correct += right
        seen += counted
        pending.append(loss.detach())
        if step % log_every == 0 or step == total:
            _check_finite(pending, epoch, step)
            pending.clear()
            bar.set_postfix(loss=f"{(loss_sum / seen).item():.4f}")
        if should_stop():
            break
    _check_finite(pending, epoch, step)
    totals = _all_reduce(torch.stack([loss_sum, correct, seen]))
    return {"loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item(), "lrs": lrs}


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Gradients of `loss` added to those already held (fp16: of the scaled loss)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(model, optimizer, scaler: torch.amp.GradScaler | None, grad_clip: float | None) -> None:
    """One step on the summed gradients, then clear them. fp16: unscale before clipping, so the
    clip sees true norms; the scaler skips the step when a gradient overflowed."""
    if scaler is not None:
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _check_finite(losses: list[torch.Tensor], epoch: int, last_step: int) -> None:
    if not losses:
        return
    finite = torch.isfinite(torch.stack(losses)).tolist()  # one host sync per interval
    if not all(finite):
        step = last_step - len(losses) + 1 + finite.index(False)
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {step}")


@torch.no_grad()
def evaluate(model, batches: Iterable, task: Task, *, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss (`Task.mean_loss`), probabilities (N, C) and labels (N,) or (N, K), gathered from all ranks."""
    model.eval()
    probs, labels = [], []
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = model(x)
        probs.append(task.probabilities(logits))
        labels.append(y)
    probs_t = torch.cat(probs) if probs else torch.zeros(0, 0, device=device)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    probs_np, labels_np = _gather(probs_t.cpu().numpy(), labels_t.cpu().numpy())
    return task.mean_loss(probs_np, labels_np), probs_np, labels_np


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _gather(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's predictions, each image once, in the split's order (rank r held r, r+W, ...)."""
    if not (dist.is_available() and dist.is_initialized()):
        return probs, labels
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, (probs, labels))
    n = sum(len(p[1]) for p in parts)
    out_probs = np.zeros((n, parts[0][0].shape[1]), dtype=np.float32)
    out_labels = np.zeros((n, *parts[0][1].shape[1:]), dtype=np.int64)
    for rank, (p, y) in enumerate(parts):
        out_probs[rank::world], out_labels[rank::world] = p, y
    return out_probs, out_labels

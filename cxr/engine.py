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
    so k batches of b images step as one batch of k x b would; under DDP only a group's last batch
    all-reduces them. The scheduler steps after each optimizer step the fp16 scaler did not skip.
    `should_stop` is asked once after every batch (under torchrun, by every rank together): the
    epoch ends there, without stepping on a partial group.
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
        with gradient_sync(model, step == group_end):
            with autocast(device, amp_dtype):
                logits = model(x)
                loss = task.loss(logits, labels, pos_weight)
            backward(loss / group_size, scaler)
        if step == group_end:
            lr = optimizer.param_groups[0]["lr"]
            if optimizer_step(model, optimizer, scaler, grad_clip):
                lrs.append(lr)
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


def gradient_sync(model, sync: bool):
    """The block of a micro-batch's forward and backward: DDP all-reduces the gradients in every
    backward unless inside its no_sync() (which must hold the forward too), so the batches of an
    accumulation group that do not step skip it, and the group's last all-reduces their sum."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Gradients of `loss` added to those already held (fp16: of the scaled loss)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(model, optimizer, scaler: torch.amp.GradScaler | None, grad_clip: float | None) -> bool:
    """One step on the summed gradients, then clear them; whether the parameters moved. fp16:
    unscale before clipping, so the clip sees true norms; the scaler skips the step when a
    gradient overflowed, and says so by lowering its scale (the PyTorch AMP recipe's test)."""
    stepped = True
    if scaler is not None:
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale
    else:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


def _check_finite(losses: list[torch.Tensor], epoch: int, last_step: int) -> None:
    if not losses:
        return
    finite = torch.isfinite(torch.stack(losses)).tolist()  # one host sync per interval
    if not all(finite):
        step = last_step - len(losses) + 1 + finite.index(False)
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {step}")


@torch.no_grad()
def predict_logits(model, batches: Iterable, *, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) or (N, K) of every batch, gathered from all ranks.

    In float32, whatever trainer.amp trains in: these logits pick the best epoch, the threshold and
    the temperature and give the test metrics, so they are those of the network cxr.predict runs
    (float32). Under bf16 autocast they would take a few hundred distinct values (ties in AUROC,
    a coarse threshold grid) and differ from predict's near the threshold.
    """
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x).float())
        labels.append(y)
    logits_t = torch.cat(logits) if logits else torch.zeros(0, 0, device=device)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return _gather(logits_t.cpu().numpy(), labels_t.cpu().numpy())


def evaluate(model, batches: Iterable, task: Task, *, device: torch.device) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss (`Task.mean_loss`), probabilities (N, C) and labels (N,) or (N, K), gathered from all ranks."""
    logits, labels = predict_logits(model, batches, device=device)
    probs = task.probabilities(torch.from_numpy(logits)).numpy()
    return task.mean_loss(probs, labels), probs, labels


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _gather(outputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's outputs and labels, each image once, in the split's order (rank r held r, r+W, ...)."""
    if not (dist.is_available() and dist.is_initialized()):
        return outputs, labels
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, (outputs, labels))
    n = sum(len(p[1]) for p in parts)
    out_outputs = np.zeros((n, parts[0][0].shape[1]), dtype=np.float32)
    out_labels = np.zeros((n, *parts[0][1].shape[1:]), dtype=np.int64)
    for rank, (o, y) in enumerate(parts):
        out_outputs[rank::world], out_labels[rank::world] = o, y
    return out_outputs, out_labels

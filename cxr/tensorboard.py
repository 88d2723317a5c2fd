"""Everything cxr writes to TensorBoard: per-epoch scalars, test results, figures, HParams.

A run's `RunBoard` writes into the run's own folder (one TensorBoard run per job). Under torchrun
only rank 0 writes; the other ranks get a board that writes nothing. `write_experiment` gives a
sweep one HParams experiment, so that TensorBoard's table opens on what the sweep varied.
"""

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torch.utils.tensorboard.summary import hparams  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from cxr import calibration  # noqa: E402
from cxr.batches import Augment, denormalise, preprocess  # noqa: E402
from cxr.config import description  # noqa: E402
from cxr.explain import GradCamUnavailable, grad_cam, overlay  # noqa: E402
from cxr.results import DECIDING_METRICS  # noqa: E402
from cxr.task import Task  # noqa: E402

log = logging.getLogger("cxr")


def hparams_of(cfg) -> dict:
    """The hyperparameters a run shows in the HParams dashboard (and stores in result.json): what
    describes it (cxr.config's `described` keys). None, lists and booleans as text: HParams has no
    null or list, and torch's writer would store a bool as the number 0 or 1."""
    return {key: value if isinstance(value, int | float | str) and not isinstance(value, bool) else str(value)
            for key, value in description(cfg).items()}


def _finite(value) -> bool:
    return value is not None and not math.isnan(value)


class RunBoard:
    """The TensorBoard writer of one run; does nothing when `enabled` is false (ranks > 0)."""

    def __init__(self, output_dir, first_epoch: int, enabled: bool):
        # purge_step: a resumed run drops the events of epochs it is about to redo
        self.writer = SummaryWriter(str(output_dir), purge_step=first_epoch) if enabled else None

    def epoch(self, row: dict) -> None:
        """One history row: every metric at step = epoch, flushed so the dashboard is live."""
        if self.writer is None:
            return
        for tag, value in row.items():
            if tag != "epoch" and _finite(value):
                self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()

    def learning_rates(self, lrs: list[float], first_step: int) -> None:
        """`train/lr`: the (head's) learning rate of each optimizer step, steps counted from 1
        over the whole run (so warmup and schedule show as they are, whatever an epoch holds)."""
        if self.writer is None:
            return
        for step, lr in enumerate(lrs, start=first_step):
            self.writer.add_scalar("train/lr", lr, step)

    def test(self, metrics: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in metrics.items():
            if tag.startswith("test/") and _finite(value):
                self.writer.add_scalar(tag, value, step)

    def hparams(self, values: dict, metrics: dict) -> None:
        """The run's HParams session (its hyperparameters and final metrics) in its own event
        file; the experiment (which columns, in which order) is the sweep's, see write_experiment."""
        if self.writer is None:
            return
        shown = {k: metrics[k] for k in DECIDING_METRICS if _finite(metrics.get(k))}
        _, session_start, session_end = hparams(values, shown)
        for summary in (session_start, session_end):
            self.writer.file_writer.add_summary(summary)

    def input_grid(self, images: torch.Tensor, task: Task, labels: torch.Tensor,
                   augment: Augment | None = None) -> None:
        """The preprocessed training images as the network receives them (augmented, where
        data.augment is set), once per run."""
        if self.writer is None:
            return
        inputs = preprocess(images, channels_last=False, augment=augment)
        self.writer.add_image("inputs/train", make_grid(denormalise(inputs).cpu(), nrow=8), 0)
        names = [task.label_name(y) for y in labels.cpu().numpy()]
        self.writer.add_text("inputs/train_labels", ", ".join(names), 0)

    def test_figures(self, labels: np.ndarray, probs: np.ndarray, confusion: list, task: Task, step: int) -> None:
        """The confusion matrix (single-label runs), the ROC curves the task shows (the positive
        class; multi-label: every finding, in one figure) and the reliability diagram."""
        if self.writer is None:
            return
        if not task.multilabel:
            fig, ax = plt.subplots(figsize=(4, 4))
            ConfusionMatrixDisplay(np.array(confusion), display_labels=task.classes).plot(ax=ax, colorbar=False)
            ax.set_title("test confusion matrix")
            self.writer.add_figure("test/confusion_matrix", fig, step)  # add_figure closes the figure
        curves = task.roc_curves(labels, probs)
        if curves:
            fig, ax = plt.subplots(figsize=(5, 5) if task.multilabel else (4, 4))
            for name, truth, score in curves:
                RocCurveDisplay.from_predictions(truth, score, ax=ax, name=name)
            ax.set_title("test ROC per finding" if task.multilabel else "test ROC")
            self.writer.add_figure("test/roc", fig, step)
        self.reliability(labels, probs, task, step)

    def reliability(self, labels: np.ndarray, probs: np.ndarray, task: Task, step: int) -> None:
        """`test/reliability`: the reliability diagram of what test/ece reads (observed frequency
        against mean predicted probability in calibration.BINS equal-width bins, beside the
        diagonal of perfect calibration); multi-label: one panel per finding."""
        curves = [curve for curve in task.reliability_curves(labels, probs) if len(curve[1])]
        if self.writer is None or not curves:
            return
        columns = min(4, len(curves))
        rows = math.ceil(len(curves) / columns)
        fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(3.6 * columns, 3.6 * rows))
        for ax, (name, outcome, score) in zip(axes.flat, curves, strict=False):
            outcome = outcome.astype(np.int64)
            CalibrationDisplay.from_predictions(outcome, score, n_bins=calibration.BINS, pos_label=1, ax=ax, name=name)
            ax.set_title(f"{name}: ECE {calibration.calibration_error(score, outcome):.3f}", fontsize=9)
        for ax in axes.flat[len(curves):]:
            ax.axis("off")
        fig.tight_layout()
        self.writer.add_figure("test/reliability", fig, step)

    def gradcam(self, model, images: torch.Tensor, labels: np.ndarray, probs: np.ndarray,
                task: Task, step: int, per_class: int = 4) -> None:
        """Grad-CAM on the first few test images of each class, one row each, for the positive
        class; multi-label: one row per finding, its positive images, for that finding.

        `images` are the split's uint8 squares (N, 1, S, S) as cached (on the host), so the overlays
        are at the network's input size; `python -m cxr.predict ... gradcam=DIR` writes them at full
        size.
        """
        if self.writer is None:
            return
        rows, classes = task.explained_rows(labels, per_class), task.classes
        try:
            cams = row_cams(model, task, images, rows)
        except GradCamUnavailable as reason:
            log.info("no test/gradcam figure: %s", reason)
            return
        fig, axes = plt.subplots(len(rows), per_class, squeeze=False, figsize=(2.2 * per_class, 2.4 * len(rows)))
        for ax in axes.flat:
            ax.axis("off")
        for row, indices, target in rows:  # a finding without positive test images: its row stays empty
            for col, (i, cam) in enumerate(zip(indices, cams.get(row, ()), strict=True)):
                axes[row, col].imshow(overlay(images[i, 0].cpu().numpy(), cam))
                shown = f"{task.row_title(row, labels[i])}  P({classes[target]})={probs[i, target]:.2f}"
                axes[row, col].set_title(shown, fontsize=7)
        fig.tight_layout()
        self.writer.add_figure("test/gradcam", fig, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def row_cams(model, task: Task, images: torch.Tensor, rows: list[tuple[int, np.ndarray, int]]) -> dict:
    """The Grad-CAM maps of each figure row's images, {row: maps}: one forward and backward pass
    per explained output (single-label: every row explains the positive class), not per row."""
    cams = {}
    for target in dict.fromkeys(target for _, indices, target in rows if len(indices)):
        members = [(row, indices) for row, indices, explained in rows if explained == target and len(indices)]
        chosen = np.concatenate([indices for _, indices in members])
        inputs = images[chosen].to(next(model.parameters()).device)
        maps, _ = grad_cam(model, task, preprocess(inputs, channels_last=False), target)
        for row, part in zip((row for row, _ in members), maps.split([len(i) for _, i in members]), strict=True):
            cams[row] = part
    return cams


def write_experiment(folder, runs_hparams: list[dict], metrics: list[str]) -> None:
    """One HParams experiment for a sweep's folder: every hyperparameter of its runs, those that
    differ between runs marked so (TensorBoard lists and checks them first), and the metrics in
    the order given (the deciding ones first). Without it TensorBoard builds the experiment from
    the runs and the table opens on the alphabetically first hyperparameters, constant ones too."""
    names = list(dict.fromkeys(k for run in runs_hparams for k in run))
    differs = {k for k in names if len({repr(run.get(k)) for run in runs_hparams}) > 1}
    example = {k: next(run[k] for run in runs_hparams if k in run) for k in names}
    experiment_summary, _, _ = hparams(example, dict.fromkeys(metrics, 0.0))
    value = experiment_summary.value[0]
    content = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in differs
    value.metadata.plugin_data.content = content.SerializeToString()
    for previous in Path(folder).glob("events.out.tfevents.*"):  # a rebuilt report replaces it
        previous.unlink()
    with SummaryWriter(str(folder)) as writer:
        writer.file_writer.add_summary(experiment_summary)

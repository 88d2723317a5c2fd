"""TensorBoard figures: what the network sees, and how it did on the test split."""

import matplotlib

matplotlib.use("Agg")  # headless: figures are written, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from cxr.data import MEAN, STD  # noqa: E402


def denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def log_input_grid(writer, inputs: torch.Tensor, classes: list[str], labels: torch.Tensor) -> None:
    """The preprocessed training images as the network receives them, once per run."""
    writer.add_image("inputs/train", make_grid(denormalise(inputs.float()).cpu(), nrow=8), 0)
    writer.add_text("inputs/train_labels", ", ".join(classes[i] for i in labels.tolist()), 0)


def log_test_figures(writer, labels: np.ndarray, probs: np.ndarray, confusion: list,
                     classes: list[str], positive: int, step: int) -> None:
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay(np.array(confusion), display_labels=classes).plot(ax=ax, colorbar=False)
    ax.set_title("test confusion matrix")
    writer.add_figure("test/confusion_matrix", fig, step)  # add_figure closes the figure
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        RocCurveDisplay.from_predictions(labels == positive, probs[:, positive], ax=ax,
                                         name=classes[positive])
        ax.set_title("test ROC")
        writer.add_figure("test/roc", fig, step)

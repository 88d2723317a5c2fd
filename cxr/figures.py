"""TensorBoard figures: what the network sees, how it did on the test split, and where it looked."""

import matplotlib

matplotlib.use("Agg")  # headless: figures are written, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from cxr.data import MEAN, STD, preprocess  # noqa: E402
from cxr.explain import grad_cam, overlay  # noqa: E402


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


def log_gradcam(writer, model, images: torch.Tensor, labels: np.ndarray, probs: np.ndarray,
                classes: list[str], positive: int, step: int, per_class: int = 4) -> None:
    """Grad-CAM of the positive class on the first few test images of each class, one row each.

    `images` are the split's uint8 squares (N, 1, S, S) as cached, so the overlays are at the
    network's input size; `python -m cxr.predict ... gradcam=DIR` writes them at full size.
    """
    picks = [np.flatnonzero(labels == c)[:per_class] for c in range(len(classes))]
    cells = [(row, col, i) for row, indices in enumerate(picks) for col, i in enumerate(indices)]
    chosen = [i for _, _, i in cells]
    cams, _ = grad_cam(model, preprocess(images[chosen], channels_last=False), positive)
    fig, axes = plt.subplots(len(classes), per_class, squeeze=False,
                             figsize=(2.2 * per_class, 2.4 * len(classes)))
    for ax in axes.flat:
        ax.axis("off")
    for (row, col, i), cam in zip(cells, cams, strict=True):
        ax = axes[row, col]
        ax.imshow(overlay(images[i, 0].cpu().numpy(), cam))
        ax.set_title(f"{classes[labels[i]]}  P({classes[positive]})={probs[i, positive]:.2f}",
                     fontsize=7)
    fig.tight_layout()
    writer.add_figure("test/gradcam", fig, step)

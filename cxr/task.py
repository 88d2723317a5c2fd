"""What differs between a binary, a multi-class and a multi-label run, in one place.

A `Task` is made once from the dataset (its classes, and whether a label is one class or one value
per finding), stored in best.pt, and asked by everything else: training (output units, the loss,
what counts as right), evaluation (probabilities from logits, applied exactly once), decisions (one
threshold, or one per finding), the metric set and the bootstrap's strata, the prediction CSV's
columns, the TensorBoard figure rows and the Grad-CAM target. Like torchmetrics' `task=` switch,
the kinds are named, not inferred at each use:

    binary      two classes, softmax over them; decisions by a threshold on P(positive class)
    multiclass  more classes, softmax; argmax decisions; macro-averaged metrics
    multilabel  one sigmoid per finding; labels (N, K) of 1 present, 0 absent, -1 unknown (masked
                out of the loss and every metric); a threshold per finding

The positive class (sensitivity, AUROC, Grad-CAM) is PNEUMONIA when present, else the last class.
The numbers themselves are computed in cxr.metrics (scikit-learn); this module picks which.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from cxr import calibration, metrics

KINDS = ("binary", "multiclass", "multilabel")
POSITIVE_CLASS = "PNEUMONIA"
UNKNOWN = -1  # a multi-label value that is not known (CheXpert's uncertain or blank)
NO_FINDING = "No Finding"  # the label of an image with no finding called (NIH's and CheXpert's name)
RESAMPLED_ROWS = 100  # bootstrap resamples scored at a time (memory: rows x images x classes)


@dataclass(frozen=True)
class Task:
    kind: str
    classes: tuple[str, ...]  # class names, or (multilabel) the findings, in output order

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {'|'.join(KINDS)}, got {self.kind}")

    @classmethod
    def of(cls, classes: Sequence[str], multilabel: bool) -> "Task":
        """The task of a dataset with these classes (or findings)."""
        kind = "multilabel" if multilabel else "binary" if len(classes) == 2 else "multiclass"
        return cls(kind, tuple(classes))

    @classmethod
    def of_labels(cls, classes: Sequence[str], labels) -> "Task":
        """From a label array: (N,) class indices, or (N, K) values per finding."""
        return cls.of(classes, multilabel=np.ndim(labels) == 2)

    @classmethod
    def of_item(cls, classes: Sequence[str], label) -> "Task":
        """From one listed item's label: a class index, or a tuple of values per finding."""
        return cls.of(classes, multilabel=isinstance(label, tuple))

    @classmethod
    def from_state(cls, state: dict) -> "Task":
        return cls(state["kind"], tuple(state["classes"]))

    def state(self) -> dict:
        """What checkpoints and result.json store: rebuilt by `from_state`."""
        return {"kind": self.kind, "classes": list(self.classes)}

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    def stratum(self, label) -> int:
        """The class an item is balanced by when splits are carved: its class; multi-label items
        have no one class and form one stratum."""
        return 0 if self.multilabel else int(label)

    @property
    def outputs(self) -> int:
        """Units of the network's output layer."""
        return len(self.classes)

    @property
    def positive(self) -> int:
        """The class Grad-CAM explains by default, whose sensitivity a binary run reports: PNEUMONIA
        when present, else the last class (multi-label: the first finding)."""
        if self.multilabel:
            return 0
        return self.classes.index(POSITIVE_CLASS) if POSITIVE_CLASS in self.classes else len(self.classes) - 1

    # -----------------------------------------------------------------------------------------
    # Training: torch tensors on the device

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of class indices; multi-label: binary cross-entropy per finding (positives
        weighted by pos_weight) averaged over the known entries only, so an unknown label neither
        rewards nor punishes any output. In float32 at least: half-precision logits (AMP) are
        upcast, float64 ones (temperature fitting) kept."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if not self.multilabel:
            return F.cross_entropy(logits, labels)
        known = labels >= 0
        losses = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0).to(logits.dtype),
                                                    pos_weight=pos_weight, reduction="none")
        return (losses * known).sum() / known.sum().clamp(min=1)

    def pos_weight(self, labels: torch.Tensor, rule: str) -> torch.Tensor | None:
        """trainer.pos_weight=balanced (multi-label): each finding's positives weighted by its
        negatives / positives among the known training labels (1 where a finding has no
        positives); None otherwise."""
        if rule != "balanced" or not self.multilabel:
            return None
        positives, negatives = (labels == 1).sum(0).float(), (labels == 0).sum(0).float()
        return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))

    def right(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which answers are right, images (argmax) or (image, finding) entries called at
        probability >= 0.5 (multi-label), as `decide` calls them; and (multi-label) which count:
        the known entries (None: every image)."""
        if not self.multilabel:
            return logits.argmax(1) == labels, None
        known = labels >= 0
        return ((logits >= 0) == (labels == 1)) & known, known

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Right answers and how many were counted."""
        right, known = self.right(logits, labels)
        return right.sum(), labels.shape[0] if known is None else known.sum()

    def all_right(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per temperature (`temperatures`): whether every image (multi-label: every known entry
        of the finding) is answered right."""
        right, known = self.right(logits, labels)
        return right.all().reshape(1) if known is None else (right | ~known).all(dim=0)

    @property
    def temperatures(self) -> int:
        """How many temperatures calibration fits: one per finding (independent sigmoids), else one
        for the softmax."""
        return len(self.classes) if self.multilabel else 1

    def probabilities(self, logits: torch.Tensor, temperature: float | list[float] | None = None) -> torch.Tensor:
        """Softmax over the classes, or one independent sigmoid per finding, in float32, of the
        logits divided by the temperature fitted on validation (trainer.calibration=temperature:
        one, or one per finding; None: the logits as they are)."""
        logits = logits.float()
        if temperature is not None:
            logits = logits / torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def log_odds(self, logits: torch.Tensor, target: int) -> torch.Tensor:
        """log(p / (1 - p)) of output `target` per image (B,), what Grad-CAM explains: a sigmoid's
        logit; under softmax the target's logit minus the log-sum-exp of the others'. A softmax
        logit alone also holds a part common to every class, which moves no probability: with a
        frozen backbone's standardised features that part can outweigh the rest and leave the
        map of a confident answer blank. (No saturation either: log(p) stops moving as p -> 1.)"""
        logits = logits.float()
        if self.multilabel:
            return logits[:, target]
        others = torch.cat([logits[:, :target], logits[:, target + 1:]], dim=1)
        return logits[:, target] - torch.logsumexp(others, dim=1)

    # -----------------------------------------------------------------------------------------
    # Decisions and metrics: numpy arrays, probabilities (N, C) and labels (N,) or (N, K)

    def mean_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """Cross-entropy of the true classes; multi-label: binary cross-entropy over the known
        entries (unweighted, so validation losses compare across trainer.pos_weight settings)."""
        if not self.multilabel:
            picked = probs[np.arange(len(labels)), labels]
            return float(-np.log(np.clip(picked, 1e-12, 1)).mean()) if len(labels) else math.nan
        known = labels >= 0
        if not known.any():
            return math.nan
        likelihood = np.where(labels == 1, probs, 1 - probs)
        return float(-np.log(np.clip(likelihood[known], 1e-12, 1)).mean())

    def choose_threshold(self, rule: str, labels: np.ndarray, probs: np.ndarray) -> float | list[float]:
        """From validation only: a fixed number, or Youden's J (max TPR - FPR). Multi-class runs
        decide by argmax and keep the number unused; multi-label: one per finding, from its known
        entries."""
        if self.multilabel:
            known = labels >= 0
            return [metrics.binary_threshold(rule, labels[known[:, k], k] == 1, probs[known[:, k], k])
                    for k in range(labels.shape[1])]
        if self.kind == "multiclass":
            return 0.5 if rule == "youden" else float(rule)
        return metrics.binary_threshold(rule, labels == self.positive, probs[:, self.positive])

    @property
    def reference_threshold(self) -> float | list[float]:
        """The reference's fixed 0.5 (per finding)."""
        return [0.5] * len(self.classes) if self.multilabel else 0.5

    def decide(self, probs: np.ndarray, threshold) -> np.ndarray:
        """Class indices (N,): by the threshold on P(positive) for two classes, argmax for more;
        multi-label: 1/0 per finding (N, K)."""
        if self.multilabel:
            return (probs >= np.asarray(threshold)).astype(np.int64)
        if self.kind == "binary":
            return np.where(probs[:, self.positive] >= threshold, self.positive, 1 - self.positive)
        return probs.argmax(axis=1)

    def metrics(self, labels: np.ndarray, probs: np.ndarray, threshold) -> dict:
        """acc, balanced_acc, auroc, sensitivity, specificity, precision, f1 (NaN where undefined),
        and calibration (cxr.calibration): ece, ece_quantile, brier, nll of P(positive class);
        multi-class: of the top label, with ece_classwise; multi-label: the macro means and
        `<metric>/<finding>`."""
        decisions = self.decide(probs, threshold)
        if self.multilabel:
            return {**metrics.multilabel_metrics(labels, probs, decisions, self.classes),
                    **calibration.multilabel_calibration(labels, probs, self.classes)}
        if self.kind == "binary":
            return {**metrics.single_label_metrics(labels, probs, decisions, self.positive),
                    **calibration.binary_calibration((labels == self.positive).astype(np.int64),
                                                     probs[:, self.positive])}
        return {**metrics.single_label_metrics(labels, probs, decisions, None),
                **calibration.multiclass_calibration(labels, probs)}

    def resampled_metrics(self, labels: np.ndarray, probs: np.ndarray, threshold, idx: np.ndarray,
                          with_calibration: bool = True) -> dict:
        """Every scalar of `metrics` (the calibration ones only `with_calibration`) on every row of
        resampled indices idx (B, N) at once: arrays (B,), equal to `metrics` on each row (what the
        bootstrap's intervals and cxr.compare's paired differences score), RESAMPLED_ROWS rows at a
        time: the (rows, N) arrays stay small on a large test split (NIH's 25,596 images)."""
        parts = [self._resampled(labels, probs, threshold, idx[start:start + RESAMPLED_ROWS], with_calibration)
                 for start in range(0, len(idx), RESAMPLED_ROWS)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]} if parts else {}

    def _resampled(self, labels: np.ndarray, probs: np.ndarray, threshold, idx: np.ndarray,
                   with_calibration: bool) -> dict:
        decisions = self.decide(probs, threshold)
        if self.multilabel:
            scores = metrics.resampled_multilabel(labels, probs, decisions, idx, self.classes)
            calibrated = partial(calibration.resampled_multilabel, labels, probs, idx, self.classes)
        elif self.kind == "binary":
            scores = metrics.resampled_single_label(labels, probs, decisions, idx, self.positive)
            calibrated = partial(calibration.resampled_binary, (labels == self.positive).astype(np.int64),
                                 probs[:, self.positive], idx)
        else:
            scores = metrics.resampled_single_label(labels, probs, decisions, idx, None)
            calibrated = partial(calibration.resampled_multiclass, labels, probs, idx)
        return {**scores, **calibrated()} if with_calibration else scores

    def confusion(self, labels: np.ndarray, probs: np.ndarray, threshold) -> list:
        """Rows: true class, columns: decision; multi-label: one [[tn, fp], [fn, tp]] per finding."""
        decisions = self.decide(probs, threshold)
        if self.multilabel:
            return metrics.finding_tables(labels, decisions)
        return metrics.confusion(labels, decisions, len(self.classes))

    def strata(self, labels: np.ndarray) -> list[np.ndarray]:
        """The bootstrap's strata: each class resampled within itself; multi-label images within
        their label combinations, so every resample keeps each finding's positives, negatives and
        unknowns (and the findings a macro mean averages stay the same in every resample)."""
        rows = labels if self.multilabel else labels[:, None]
        _, combination = np.unique(rows, axis=0, return_inverse=True)
        return [np.flatnonzero(combination.ravel() == c) for c in range(combination.max() + 1)] if len(rows) else []

    def intervals(self, labels: np.ndarray, probs: np.ndarray, threshold, resamples: int, seed: int = 0) -> dict:
        """95% percentile bootstrap intervals of every scalar metric over `resamples` resamples of the
        strata, computed for all resamples at once; multi-label: each finding's own metrics
        resampled within its positives, negatives and unknowns (a rare finding keeps its few
        positives in every resample). The seed is fixed: a run reports the same intervals."""
        if resamples <= 0 or len(labels) == 0:
            return {}
        idx = metrics.resample_indices(self.strata(labels), resamples, seed)
        intervals = metrics.percentile_intervals(self.resampled_metrics(labels, probs, threshold, idx))
        decisions = self.decide(probs, threshold)
        for k, name in enumerate(self.classes if self.multilabel else ()):
            column = labels[:, k]
            own = metrics.resample_indices([np.flatnonzero(column == value) for value in np.unique(column)],
                                           resamples, seed)
            rates = metrics.resampled_rates(column, decisions[:, k], own, 1)
            values = {"auroc": metrics.resampled_auroc(column, probs[:, k], own),
                      "sensitivity": rates["sensitivity"], "specificity": rates["specificity"],
                      **calibration.resampled_binary(column, probs[:, k], own)}
            intervals.update({f"{metric}/{name}": interval
                              for metric, interval in metrics.percentile_intervals(values).items()})
        return intervals

    def macro_findings(self, labels: np.ndarray) -> list[str] | None:
        """Multi-label: the findings whose AUROC the split defines (both values among its known
        labels): what the macro AUROC and its interval average over, in every resample alike.
        None for single-label runs."""
        if not self.multilabel:
            return None
        return [name for k, name in enumerate(self.classes) if len(np.unique(labels[labels[:, k] >= 0, k])) == 2]

    def warnings(self, labels: np.ndarray, probs: np.ndarray, threshold) -> list[str]:
        """What makes a finished run's result meaningless (constant answers, below the majority rate
        or, multi-label, a mean AUROC at chance)."""
        if len(labels) == 0:
            return []
        decisions = self.decide(probs, threshold)
        if self.multilabel:
            return metrics.multilabel_warnings(labels, probs, decisions)
        return metrics.single_label_warnings(labels, decisions, self.classes)

    def majority_rate(self, labels: np.ndarray) -> float:
        """Accuracy of always answering the commonest class (multi-label: each finding's commoner
        value, over the known entries): the floor any model must beat."""
        if self.multilabel:
            return metrics.finding_majority_rate(labels)
        return metrics.majority_rate(labels)

    def format_values(self, values) -> str:
        """A threshold or temperature: one number, or (multi-label) one per finding."""
        return " ".join(f"{v:.3f}" for v in values) if self.multilabel else f"{values:.3f}"

    # -----------------------------------------------------------------------------------------
    # What people read: labels, prediction rows, figure rows

    def label_name(self, label) -> str:
        """A class name; multi-label: the findings that are 1, joined by | (No Finding for none)."""
        if not self.multilabel:
            return self.classes[int(label)]
        return "|".join(name for name, value in zip(self.classes, label, strict=True) if value == 1) or NO_FINDING

    def prediction_columns(self, with_truth: bool) -> list[str]:
        """The columns of a predictions CSV: path, a probability per class (or finding), the label
        decided, the truth (with_truth: the class; multi-label: 1, 0 or empty for unknown, per
        finding) and the status."""
        truth = ([f"truth_{name}" for name in self.classes] if self.multilabel else ["truth"]) if with_truth else []
        return ["path", *(f"prob_{name}" for name in self.classes), "label", *truth, "status"]

    def prediction_row(self, path: str, probs: np.ndarray, decision, truth=None) -> dict:
        """One image's row of `prediction_columns`. Probabilities are written to 9 significant
        digits, which float32 round-trips: metrics recomputed from the file equal the run's."""
        row = {"path": path, **{f"prob_{name}": f"{p:.9g}" for name, p in zip(self.classes, probs, strict=True)},
               "label": self.label_name(decision), "status": "ok"}
        if truth is not None and self.multilabel:
            row.update({f"truth_{name}": "" if value == UNKNOWN else str(int(value))
                        for name, value in zip(self.classes, truth, strict=True)})
        elif truth is not None:
            row["truth"] = self.classes[int(truth)]
        return row

    def reliability_curves(self, labels: np.ndarray, probs: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, outcome, score) of each reliability diagram a run shows, as its `ece` reads them:
        P(positive class) of a binary run, the top label's probability against whether the argmax
        is right (multi-class), each finding over its known entries (multi-label)."""
        if self.multilabel:
            return [(name, labels[labels[:, k] >= 0, k] == 1, probs[labels[:, k] >= 0, k])
                    for k, name in enumerate(self.classes)]
        if self.kind == "binary":
            return [(self.classes[self.positive], labels == self.positive, probs[:, self.positive])]
        return [("top label", probs.argmax(axis=1) == labels, probs.max(axis=1))]

    def truth_of_row(self, row: dict) -> int | tuple[int, ...]:
        """The label a `prediction_row` with truth holds: the class index; multi-label: 1, 0 or
        -1 (unknown) per finding."""
        if self.multilabel:
            return tuple(int(row[f"truth_{name}"]) if row[f"truth_{name}"] != "" else UNKNOWN for name in self.classes)
        return self.classes.index(row["truth"])

    def roc_curves(self, labels: np.ndarray, probs: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, truth, score) of each ROC curve a run shows: the positive class of a binary run,
        each finding (its known entries) of a multi-label one, where both values occur."""
        if self.multilabel:
            curves = [(name, labels[labels[:, k] >= 0, k] == 1, probs[labels[:, k] >= 0, k])
                      for k, name in enumerate(self.classes)]
        elif self.kind == "binary":
            curves = [(self.classes[self.positive], labels == self.positive, probs[:, self.positive])]
        else:
            curves = []
        return [(name, truth, score) for name, truth, score in curves if len(np.unique(truth)) == 2]

    def explained_rows(self, labels: np.ndarray, per_row: int) -> list[tuple[int, np.ndarray, int]]:
        """Grad-CAM figure rows: (row, the first few images, the output explained). One row per
        class of its images, explaining the positive class; multi-label: one per finding, of its
        positive images, explaining that finding."""
        if self.multilabel:
            return [(k, np.flatnonzero(labels[:, k] == 1)[:per_row], k) for k in range(len(self.classes))]
        return [(k, np.flatnonzero(labels == k)[:per_row], self.positive) for k in range(len(self.classes))]

    def row_title(self, row: int, label) -> str:
        """How a Grad-CAM image's truth is shown: its class, or the row's finding marked present."""
        return f"{self.classes[row]}+" if self.multilabel else self.classes[int(label)]

    def cam_target(self, name: str | None) -> int:
        """The output Grad-CAM explains: `name`, else the positive class (multi-label: the first
        finding). Raises ValueError for a name that is not one of the classes."""
        if name is None:
            return self.positive
        if name not in self.classes:
            raise ValueError(f"{name} is not one of the classes: {', '.join(self.classes)}")
        return self.classes.index(name)

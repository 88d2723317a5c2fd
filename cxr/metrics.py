"""Classification metrics (scikit-learn), the decision threshold, and bootstrap intervals.

Binary data (NORMAL vs PNEUMONIA): probabilities of the positive class are compared with a
threshold chosen on validation; sensitivity, precision and F1 are those of PNEUMONIA, specificity
is the recall of NORMAL. More classes (e.g. NORMAL/BACTERIA/VIRUS): argmax decisions and macro
averages, i.e. the unweighted mean over classes of the one-vs-rest values.

A metric that the data leave undefined (sensitivity without positives, precision without positive
decisions, AUROC with one class present) is NaN, which result.json writes as null, rather than a
made-up 0 that would read as a real, bad score.
"""

import math
from collections import defaultdict

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def decide(probs: np.ndarray, threshold: float, positive: int) -> np.ndarray:
    """Class decisions: threshold on P(positive) for two classes, argmax otherwise."""
    if probs.shape[1] == 2:
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    return probs.argmax(axis=1)


def auroc(labels: np.ndarray, probs: np.ndarray, positive: int) -> float:
    """ROC AUC (one-vs-rest macro for more classes); NaN when a class is absent."""
    if len(np.unique(labels)) < probs.shape[1]:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels == positive, probs[:, positive]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def scalar_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float, positive: int) -> dict:
    """acc, balanced_acc, auroc, sensitivity, specificity, precision, f1 (NaN if undefined)."""
    preds = decide(probs, threshold, positive)
    classes = np.arange(probs.shape[1])
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=classes, average=None, zero_division=np.nan)
    # one-vs-rest 2x2 tables [[tn, fp], [fn, tp]]: specificity of class k is tn / (tn + fp)
    tables = multilabel_confusion_matrix(labels, preds, labels=classes)
    tn, fp = tables[:, 0, 0], tables[:, 0, 1]
    with np.errstate(invalid="ignore"):  # no negatives for a class: its specificity is NaN
        specificity = tn / (tn + fp)
    return {
        "acc": float(accuracy_score(labels, preds)),
        # = sklearn's balanced_accuracy_score (mean recall over the classes present), without its
        # warning when a resample or a split holds one class only
        "balanced_acc": _mean(recall),
        "auroc": auroc(labels, probs, positive),
        "sensitivity": _pick(recall, positive),
        "specificity": _pick(specificity, positive),
        "precision": _pick(precision, positive),
        "f1": _pick(f1, positive),
    }


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float,
                           positive: int) -> dict:
    """scalar_metrics() plus the confusion matrix (rows: true class, columns: decision)."""
    metrics = scalar_metrics(labels, probs, threshold, positive)
    classes = np.arange(probs.shape[1])
    metrics["confusion"] = confusion_matrix(labels, decide(probs, threshold, positive),
                                            labels=classes).tolist()
    return metrics


def _pick(per_class: np.ndarray, positive: int) -> float:
    """The positive class's value for two classes; the macro average for more."""
    return float(per_class[positive]) if len(per_class) == 2 else _mean(per_class)


def _mean(values: np.ndarray) -> float:
    """Mean over the classes where the value is defined (as sklearn's zero_division=nan does)."""
    return float(np.nanmean(values)) if not np.isnan(values).all() else math.nan


def choose_threshold(rule: str, labels: np.ndarray, probs: np.ndarray, positive: int) -> float:
    """The decision threshold, from validation only: a fixed number, or Youden's J (max TPR-FPR).

    Youden needs two classes in the labels; with more classes the decision is an argmax and the
    threshold is not used.
    """
    if rule != "youden":
        return float(rule)
    if probs.shape[1] != 2 or len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels == positive, probs[:, positive])
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold (nothing positive) is inf: a probability never exceeds 1
    return float(min(thresholds[best], 1.0))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, positive: int,
                        resamples: int = 1000, seed: int = 0) -> dict:
    """95% percentile intervals of every scalar metric over `resamples` stratified resamples.

    Each class is resampled within itself, so every resample keeps the split's class counts and
    AUROC, sensitivity and specificity are defined in all of them (a plain resample of a small
    set can miss a class). A metric still undefined in some resample (precision when nothing is
    called positive) gets None rather than an interval over the resamples where it happened to
    be defined, which would be biased. The seed is fixed: a run reports the same intervals.
    """
    if resamples <= 0 or len(labels) == 0:
        return {}
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    samples = defaultdict(list)
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        for name, value in scalar_metrics(labels[idx], probs[idx], threshold, positive).items():
            samples[name].append(value)
    intervals = {}
    for name, values in samples.items():
        values = np.asarray(values)
        defined = ~np.isnan(values)
        intervals[name] = ([float(v) for v in np.percentile(values, [2.5, 97.5])]
                           if defined.all() else None)
    return intervals


def collapse_warnings(labels: np.ndarray, probs: np.ndarray, threshold: float, positive: int,
                      classes: list[str]) -> list[str]:
    """What makes a result meaningless although the run finished: one answer for every image, or
    an accuracy below that of always answering the commonest class."""
    if len(labels) == 0:
        return []
    warnings = []
    decisions = decide(probs, threshold, positive)
    if len(np.unique(decisions)) == 1:
        warnings.append(f"constant predictions: every test image called {classes[decisions[0]]}")
    accuracy, floor = float(np.mean(decisions == labels)), majority_rate(labels)
    if accuracy < floor:
        warnings.append(f"test accuracy {100 * accuracy:.1f}% is below the majority rate {100 * floor:.1f}%")
    return warnings


def majority_rate(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class: the floor any model must beat."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else math.nan

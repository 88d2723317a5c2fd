"""Classification metrics (scikit-learn), the decision threshold, and bootstrap intervals.

Binary data (NORMAL vs PNEUMONIA): probabilities of the positive class are compared with a
threshold chosen on validation; sensitivity, precision and F1 are those of PNEUMONIA, specificity
is the recall of NORMAL. More classes (e.g. NORMAL/BACTERIA/VIRUS): argmax decisions and macro
averages, i.e. the unweighted mean over classes of the one-vs-rest values.

Multi-label data (labels (N, K): 1 present, 0 absent, -1 unknown, left out of every metric): each
finding has its own threshold (a list); per-finding AUROC, sensitivity and specificity are
reported as `auroc/<finding>` etc., and `auroc`, `sensitivity`, `specificity`, `precision`, `f1`
are their means over the findings where they are defined (the macro average). `acc` is the
label-wise accuracy (the share of known (image, finding) entries decided right) and
`balanced_acc` the mean over findings of (sensitivity + specificity) / 2.

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


def is_per_finding(threshold) -> bool:
    """A threshold per finding: the decisions are multi-label."""
    return isinstance(threshold, list | tuple | np.ndarray)


def decide(probs: np.ndarray, threshold, positive: int) -> np.ndarray:
    """Class decisions: threshold on P(positive) for two classes, argmax otherwise; multi-label
    (a threshold per finding): 1/0 per finding, (N, K)."""
    if is_per_finding(threshold):
        return (probs >= np.asarray(threshold)).astype(np.int64)
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


def scalar_metrics(labels: np.ndarray, probs: np.ndarray, threshold, positive: int,
                   findings: list[str] | None = None) -> dict:
    """acc, balanced_acc, auroc, sensitivity, specificity, precision, f1 (NaN if undefined);
    multi-label: their macro means and the per-finding `<metric>/<finding>` values."""
    if labels.ndim == 2:
        return multilabel_metrics(labels, probs, threshold, findings or [str(k) for k in range(labels.shape[1])])
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


def finding_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """One finding's ROC AUC over its known entries; NaN unless both values occur."""
    known = labels >= 0
    if len(np.unique(labels[known])) < 2:
        return math.nan
    return float(roc_auc_score(labels[known], probs[known]))


def finding_counts(labels: np.ndarray, decisions: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per finding, over the known entries: true positives, false negatives, true negatives, false positives."""
    present, absent, called = labels == 1, labels == 0, decisions == 1
    return ((called & present).sum(0), (~called & present).sum(0), (~called & absent).sum(0),
            (called & absent).sum(0))


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, thresholds, findings: list[str]) -> dict:
    """The multi-label metrics of the module docstring, at one threshold per finding."""
    tp, fn, tn, fp = finding_counts(labels, decide(probs, list(thresholds), 0))
    with np.errstate(invalid="ignore", divide="ignore"):  # a finding without positives: NaN
        sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
        precision, f1 = tp / (tp + fp), 2 * tp / (2 * tp + fp + fn)
        known = (labels >= 0).sum()
        acc = float((tp + tn).sum() / known) if known else math.nan
    aurocs = np.array([finding_auroc(labels[:, k], probs[:, k]) for k in range(len(findings))])
    metrics = {"acc": acc, "balanced_acc": _mean((sensitivity + specificity) / 2), "auroc": _mean(aurocs),
               "sensitivity": _mean(sensitivity), "specificity": _mean(specificity),
               "precision": _mean(precision), "f1": _mean(f1)}
    for k, name in enumerate(findings):
        metrics.update({f"auroc/{name}": float(aurocs[k]), f"sensitivity/{name}": float(sensitivity[k]),
                        f"specificity/{name}": float(specificity[k])})
    return metrics


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold, positive: int,
                           findings: list[str] | None = None) -> dict:
    """scalar_metrics() plus the confusion matrix (rows: true class, columns: decision);
    multi-label: one [[tn, fp], [fn, tp]] table per finding."""
    metrics = scalar_metrics(labels, probs, threshold, positive, findings)
    if labels.ndim == 2:
        tp, fn, tn, fp = finding_counts(labels, decide(probs, threshold, positive))
        metrics["confusion"] = [[[int(tn[k]), int(fp[k])], [int(fn[k]), int(tp[k])]] for k in range(len(tp))]
        return metrics
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


def choose_threshold(rule: str, labels: np.ndarray, probs: np.ndarray, positive: int):
    """The decision threshold, from validation only: a fixed number, or Youden's J (max TPR-FPR).

    Youden needs two classes in the labels; with more classes the decision is an argmax and the
    threshold is not used. Multi-label: a list, one threshold per finding from its known entries.
    """
    if labels.ndim == 2:
        known = labels >= 0
        return [binary_threshold(rule, labels[known[:, k], k] == 1, probs[known[:, k], k])
                for k in range(labels.shape[1])]
    if probs.shape[1] != 2:
        return 0.5 if rule == "youden" else float(rule)
    return binary_threshold(rule, labels == positive, probs[:, positive])


def binary_threshold(rule: str, present: np.ndarray, scores: np.ndarray) -> float:
    """A fixed number, or the threshold on `scores` maximising TPR - FPR (0.5 without both classes)."""
    if rule != "youden":
        return float(rule)
    if len(np.unique(present)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(present, scores)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold (nothing positive) is inf: a probability never exceeds 1
    return float(min(thresholds[best], 1.0))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, threshold, positive: int,
                        resamples: int = 1000, seed: int = 0, findings: list[str] | None = None) -> dict:
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
    # multi-label images have no one class: they are resampled as one group
    by_class = ([np.arange(len(labels))] if labels.ndim == 2 else
                [np.flatnonzero(labels == c) for c in np.unique(labels)])
    samples = defaultdict(list)
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        for name, value in scalar_metrics(labels[idx], probs[idx], threshold, positive, findings).items():
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
    if labels.ndim == 2:
        return multilabel_warnings(labels, probs, threshold)
    warnings = []
    decisions = decide(probs, threshold, positive)
    if len(np.unique(decisions)) == 1:
        warnings.append(f"constant predictions: every test image called {classes[decisions[0]]}")
    accuracy, floor = float(np.mean(decisions == labels)), majority_rate(labels)
    if accuracy < floor:
        warnings.append(f"test accuracy {100 * accuracy:.1f}% is below the majority rate {100 * floor:.1f}%")
    return warnings


def multilabel_warnings(labels: np.ndarray, probs: np.ndarray, thresholds) -> list[str]:
    """Multi-label: the same findings called for every image, or a mean AUROC at chance or below.
    (Label-wise accuracy is not compared with the majority rate: per-finding thresholds chosen for
    sensitivity + specificity trade accuracy on rare findings by design.)"""
    warnings = []
    if len(np.unique(decide(probs, thresholds, 0), axis=0)) == 1:
        warnings.append("constant predictions: every test image gets the same findings")
    mean_auroc = _mean(np.array([finding_auroc(labels[:, k], probs[:, k]) for k in range(labels.shape[1])]))
    if mean_auroc <= 0.5:
        warnings.append(f"mean test AUROC {mean_auroc:.3f} is at or below chance (0.5)")
    return warnings


def majority_rate(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class: the floor any model must beat.
    Multi-label: of answering each finding's commoner value, over the known entries."""
    if labels.ndim == 2:
        present, absent = (labels == 1).sum(0), (labels == 0).sum(0)
        known = (present + absent).sum()
        return float(np.maximum(present, absent).sum() / known) if known else math.nan
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else math.nan

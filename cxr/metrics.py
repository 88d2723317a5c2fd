"""Classification metrics (scikit-learn), the Youden threshold, and bootstrap intervals: the
numbers of each kind of task. Which of them a run uses, and on which decisions, is cxr.task's call.

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

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def auroc(labels: np.ndarray, probs: np.ndarray, positive: int | None) -> float:
    """ROC AUC of the positive class, or (positive None) one-vs-rest macro over the classes; NaN
    when a class is absent."""
    if len(np.unique(labels)) < probs.shape[1]:
        return math.nan
    if positive is not None:
        return float(roc_auc_score(labels == positive, probs[:, positive]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def single_label_metrics(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray,
                         positive: int | None) -> dict:
    """acc, balanced_acc, auroc, sensitivity, specificity, precision, f1 (NaN if undefined) of
    class decisions: the positive class's values, or (positive None) macro averages."""
    classes = np.arange(probs.shape[1])
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, decisions, labels=classes, average=None, zero_division=np.nan)
    # one-vs-rest 2x2 tables [[tn, fp], [fn, tp]]: specificity of class k is tn / (tn + fp)
    tables = multilabel_confusion_matrix(labels, decisions, labels=classes)
    tn, fp = tables[:, 0, 0], tables[:, 0, 1]
    with np.errstate(invalid="ignore"):  # no negatives for a class: its specificity is NaN
        specificity = tn / (tn + fp)

    def pick(per_class: np.ndarray) -> float:
        return float(per_class[positive]) if positive is not None else _mean(per_class)

    return {
        "acc": float(accuracy_score(labels, decisions)),
        # = sklearn's balanced_accuracy_score (mean recall over the classes present), without its
        # warning when a resample or a split holds one class only
        "balanced_acc": _mean(recall),
        "auroc": auroc(labels, probs, positive),
        "sensitivity": pick(recall),
        "specificity": pick(specificity),
        "precision": pick(precision),
        "f1": pick(f1),
    }


def confusion(labels: np.ndarray, decisions: np.ndarray, classes: int) -> list[list[int]]:
    """Rows: true class, columns: decision."""
    return confusion_matrix(labels, decisions, labels=np.arange(classes)).tolist()


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


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, findings) -> dict:
    """The multi-label metrics of the module docstring, of 1/0 decisions per finding."""
    tp, fn, tn, fp = finding_counts(labels, decisions)
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


def finding_tables(labels: np.ndarray, decisions: np.ndarray) -> list[list[list[int]]]:
    """One [[tn, fp], [fn, tp]] table per finding, over its known entries."""
    tp, fn, tn, fp = finding_counts(labels, decisions)
    return [[[int(tn[k]), int(fp[k])], [int(fn[k]), int(tp[k])]] for k in range(len(tp))]


def _mean(values: np.ndarray) -> float:
    """Mean over the classes where the value is defined (as sklearn's zero_division=nan does)."""
    return float(np.nanmean(values)) if not np.isnan(values).all() else math.nan


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


def resample_indices(strata: list[np.ndarray], resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, N) indices: each row draws every stratum's members with replacement, as many
    as it holds (the strata in order), so every resample keeps each stratum's size."""
    rng = np.random.default_rng(seed)
    return np.concatenate([members[rng.integers(0, len(members), (resamples, len(members)))]
                           for members in strata], axis=1)


def resampled_auroc(truth: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUROC of `scores` for truth 1 against 0 (-1 unknown: left out) on each row of indices idx
    (B, N): the Mann-Whitney U of mid-ranks (ties count half, as in roc_auc_score); NaN in a row
    without both values."""
    truth, scores = truth[idx], scores[idx].astype(np.float64)
    # unknown entries ranked above every known one: the known entries' ranks are theirs among themselves
    ranks = rankdata(np.where(truth >= 0, scores, np.inf), axis=1)
    positives, negatives = (truth == 1).sum(axis=1), (truth == 0).sum(axis=1)
    u = np.where(truth == 1, ranks, 0).sum(axis=1) - positives * (positives + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((positives > 0) & (negatives > 0), u / (positives * negatives), math.nan)


def resampled_recall(truth: np.ndarray, decisions: np.ndarray, idx: np.ndarray, value: int) -> np.ndarray:
    """Recall of `value` (the share of entries whose truth is `value` decided `value`) on each row
    of indices idx (B, N); NaN in a row without such entries."""
    members = truth[idx] == value
    right = (members & (decisions[idx] == value)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return right / members.sum(axis=1)


def resampled_rates(truth: np.ndarray, decisions: np.ndarray, idx: np.ndarray, value: int) -> dict:
    """sensitivity (recall), specificity, precision and f1 of deciding `value` against the rest, over
    the known entries (truth >= 0), on each row of indices idx (B, N): arrays (B,), NaN where the
    counts leave one undefined, as scikit-learn's zero_division=nan. Also the rows' true positives
    and negatives (`tp`, `tn`) and known entries (`known`)."""
    truth, decisions = truth[idx], decisions[idx]
    known = truth >= 0
    member, called = truth == value, (decisions == value) & known
    tp, fn = (member & called).sum(axis=1), (member & ~called).sum(axis=1)
    fp, tn = (~member & called).sum(axis=1), (~member & known & ~called).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "precision": tp / (tp + fp),
                "f1": 2 * tp / (2 * tp + fp + fn), "tp": tp, "tn": tn, "known": known.sum(axis=1)}


def resampled_single_label(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, idx: np.ndarray,
                           positive: int | None) -> dict:
    """`single_label_metrics` on each row of indices idx (B, N) at once: arrays (B,)."""
    per_class = [resampled_rates(labels, decisions, idx, k) for k in range(probs.shape[1])]
    scored = [positive] if positive is not None else range(probs.shape[1])
    # multi-class AUROC: one-vs-rest, averaged over the classes (as sklearn's multi_class="ovr")
    aurocs = [resampled_auroc((labels == k).astype(np.int64), probs[:, k], idx) for k in scored]
    values = {"acc": (labels[idx] == decisions[idx]).mean(axis=1),
              "balanced_acc": nan_mean([rates["sensitivity"] for rates in per_class]),
              "auroc": np.mean(aurocs, axis=0)}
    for name in ("sensitivity", "specificity", "precision", "f1"):
        values[name] = (per_class[positive][name] if positive is not None
                        else nan_mean([rates[name] for rates in per_class]))
    return values


def resampled_multilabel(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, idx: np.ndarray,
                         findings) -> dict:
    """`multilabel_metrics` on each row of indices idx (B, N) at once: arrays (B,)."""
    per_finding = [resampled_rates(labels[:, k], decisions[:, k], idx, 1) for k in range(len(findings))]
    aurocs = [resampled_auroc(labels[:, k], probs[:, k], idx) for k in range(len(findings))]
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = sum(r["tp"] + r["tn"] for r in per_finding) / sum(r["known"] for r in per_finding)
    values = {"acc": acc, "balanced_acc": nan_mean([(r["sensitivity"] + r["specificity"]) / 2 for r in per_finding]),
              "auroc": nan_mean(aurocs)}
    for name in ("sensitivity", "specificity", "precision", "f1"):
        values[name] = nan_mean([r[name] for r in per_finding])
    for name, rates, auroc in zip(findings, per_finding, aurocs, strict=True):
        values.update({f"auroc/{name}": auroc, f"sensitivity/{name}": rates["sensitivity"],
                       f"specificity/{name}": rates["specificity"]})
    return values


def percentile_intervals(resampled: dict[str, np.ndarray]) -> dict:
    """95% percentile intervals of each metric's resampled values: None where the metric is
    undefined in any resample (an interval over the resamples where it happened to be defined would
    be biased)."""
    return {name: [float(v) for v in np.percentile(values, [2.5, 97.5])] if not np.isnan(values).any() else None
            for name, values in resampled.items()}


def nan_mean(rows: list[np.ndarray]) -> np.ndarray:
    """The mean of equally long arrays, element by element, over those where it is defined (NaN
    where none is), as `_mean` averages over classes."""
    stacked = np.stack(rows)
    defined = ~np.isnan(stacked)
    with np.errstate(invalid="ignore"):
        return np.where(defined, stacked, 0).sum(axis=0) / defined.sum(axis=0)


def single_label_warnings(labels: np.ndarray, decisions: np.ndarray, classes) -> list[str]:
    """One answer for every image, or an accuracy below that of always answering the commonest class."""
    warnings = []
    if len(np.unique(decisions)) == 1:
        warnings.append(f"constant predictions: every test image called {classes[decisions[0]]}")
    accuracy, floor = float(np.mean(decisions == labels)), majority_rate(labels)
    if accuracy < floor:
        warnings.append(f"test accuracy {100 * accuracy:.1f}% is below the majority rate {100 * floor:.1f}%")
    return warnings


def multilabel_warnings(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray) -> list[str]:
    """The same findings called for every image, or a mean AUROC at chance or below. (Label-wise
    accuracy is not compared with the majority rate: per-finding thresholds chosen for
    sensitivity + specificity trade accuracy on rare findings by design.)"""
    warnings = []
    if len(np.unique(decisions, axis=0)) == 1:
        warnings.append("constant predictions: every test image gets the same findings")
    mean_auroc = _mean(np.array([finding_auroc(labels[:, k], probs[:, k]) for k in range(labels.shape[1])]))
    if mean_auroc <= 0.5:
        warnings.append(f"mean test AUROC {mean_auroc:.3f} is at or below chance (0.5)")
    return warnings


def majority_rate(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else math.nan


def finding_majority_rate(labels: np.ndarray) -> float:
    """Multi-label: accuracy of answering each finding's commoner value, over the known entries."""
    present, absent = (labels == 1).sum(0), (labels == 0).sum(0)
    known = (present + absent).sum()
    return float(np.maximum(present, absent).sum() / known) if known else math.nan

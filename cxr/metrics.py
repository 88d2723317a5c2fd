"""Classification metrics (scikit-learn), the decision threshold, and bootstrap intervals.

Binary data (NORMAL vs PNEUMONIA): probabilities of the positive class are compared with a
threshold chosen on validation; sensitivity is the recall of PNEUMONIA, specificity that of NORMAL.
More classes (e.g. NORMAL/BACTERIA/VIRUS): argmax decisions and macro-averaged metrics.
"""

import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

# the metrics that get 95% bootstrap intervals on the test split
INTERVAL_METRICS = ("acc", "auroc", "sensitivity", "specificity")


def predict(probs: np.ndarray, threshold: float, positive: int) -> np.ndarray:
    """Class decisions: threshold on P(positive) for two classes, argmax otherwise."""
    if probs.shape[1] == 2:
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    return probs.argmax(axis=1)


def auroc(labels: np.ndarray, probs: np.ndarray, positive: int) -> float:
    """ROC AUC (one-vs-rest macro for more classes); NaN when a class is absent."""
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels == positive, probs[:, positive]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float, positive: int) -> dict:
    """accuracy, balanced accuracy, AUROC, sensitivity, specificity, precision, F1 (+ confusion)."""
    preds = predict(probs, threshold, positive)
    classes = list(range(probs.shape[1]))
    binary = len(classes) == 2
    negative = 1 - positive
    metrics = {
        "acc": float(accuracy_score(labels, preds)),
        "balanced_acc": float(balanced_accuracy_score(labels, preds)) if len(np.unique(labels)) > 1
        else float(accuracy_score(labels, preds)),
        "auroc": auroc(labels, probs, positive),
    }
    if binary:
        metrics["sensitivity"] = float(recall_score(labels, preds, pos_label=positive, zero_division=0))
        metrics["specificity"] = float(recall_score(labels, preds, pos_label=negative, zero_division=0))
        metrics["precision"] = float(precision_score(labels, preds, pos_label=positive, zero_division=0))
        metrics["f1"] = float(f1_score(labels, preds, pos_label=positive, zero_division=0))
    else:
        metrics["sensitivity"] = float(recall_score(labels, preds, labels=classes, average="macro", zero_division=0))
        metrics["specificity"] = macro_specificity(labels, preds, classes)
        metrics["precision"] = float(precision_score(labels, preds, labels=classes, average="macro", zero_division=0))
        metrics["f1"] = float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0))
    metrics["confusion"] = confusion_matrix(labels, preds, labels=classes).tolist()
    return metrics


def macro_specificity(labels: np.ndarray, preds: np.ndarray, classes: list[int]) -> float:
    """Mean over classes of the true-negative rate of that class against the rest."""
    cm = confusion_matrix(labels, preds, labels=classes)
    total = cm.sum()
    rates = []
    for k in classes:
        negatives = total - cm[k, :].sum()
        true_negatives = negatives - (cm[:, k].sum() - cm[k, k])
        rates.append(true_negatives / negatives if negatives else 0.0)
    return float(np.mean(rates))


def choose_threshold(rule: str, labels: np.ndarray, probs: np.ndarray, positive: int) -> float:
    """The decision threshold, from validation only: a fixed number, or Youden's J (max TPR-FPR)."""
    if rule != "youden":
        return float(rule)
    if probs.shape[1] != 2 or len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels == positive, probs[:, positive])
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, positive: int,
                        resamples: int = 1000, seed: int = 0) -> dict:
    """95% percentile intervals of the test metrics over `resamples` resamples of the images."""
    if resamples <= 0:
        return {}
    rng = np.random.default_rng(seed)
    preds = predict(probs, threshold, positive)
    n = len(labels)
    values = {name: [] for name in INTERVAL_METRICS}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        y, p = labels[idx], preds[idx]
        values["acc"].append(np.mean(y == p))
        values["auroc"].append(auroc(y, probs[idx], positive))
        if probs.shape[1] == 2:
            pos, neg = y == positive, y != positive
            values["sensitivity"].append(np.mean(p[pos] == positive) if pos.any() else math.nan)
            values["specificity"].append(np.mean(p[neg] != positive) if neg.any() else math.nan)
    intervals = {}
    for name, samples in values.items():
        samples = np.asarray(samples, dtype=float)
        samples = samples[~np.isnan(samples)]
        if len(samples):
            intervals[name] = [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]
    return intervals


def majority_rate(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class: the floor any model must beat."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else math.nan

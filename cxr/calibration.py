"""Calibration: how far predicted probabilities are from the frequencies observed, and temperature
scaling, which brings them closer without changing any ranking or decision.

Each number is of one binary problem: a score per entry (the probability the model gives) and an
outcome (1 it happened, 0 it did not, -1 unknown: left out, as in every metric). cxr.task picks
the problems of a run: P(positive class) in a binary run; in a multi-class run the top label's
probability (was the argmax right?) and each class one-vs-rest; each finding in a multi-label run.

    ece           expected calibration error (Guo et al. 2017): the entries binned by score into
                  BINS equal-width bins, the sum over bins of |observed frequency - mean score|
                  x the bin's share of the entries
    ece_quantile  the same over equal-mass bins (about N / BINS entries each), which does not
                  leave most bins empty when the scores crowd near 0 and 1
    brier         mean squared difference between score and outcome
    nll           mean negative log-likelihood of the outcomes (scores clipped to [1e-12, 1])

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): the logits are
divided by one temperature T > 0 (multi-label: one per finding), fitted by LBFGS to minimise the
validation NLL of the best epoch. T > 1 softens over-confident outputs. Dividing by a positive
number keeps every ranking, so AUROC is unchanged, and a threshold chosen again on the
calibrated validation probabilities splits the images where it did before.
"""

import logging
import math

import numpy as np
import torch

log = logging.getLogger("cxr")

BINS = 15
# T is kept within these bounds: logits that lean to one side drive it to infinity (the NLL falls
# towards that of answering 1/2 everywhere)
TEMPERATURE_RANGE = (1e-2, 1e2)


def calibration_error(scores: np.ndarray, outcomes: np.ndarray, bins: int = BINS, equal_mass: bool = False) -> float:
    """ECE of `scores` against `outcomes` (1, 0; -1 unknown, masked out): bins [0, 1/B), ...,
    [(B-1)/B, 1], or (equal_mass) bins between the scores' quantiles. NaN without known entries."""
    known = outcomes >= 0
    scores, hits = scores[known].astype(np.float64), (outcomes[known] == 1).astype(np.float64)
    if len(scores) == 0:
        return math.nan
    edges = np.quantile(scores, np.linspace(0, 1, bins + 1)) if equal_mass else np.linspace(0, 1, bins + 1)
    which = np.searchsorted(edges[1:-1], scores, side="right")  # bin b holds edges[b] <= score < edges[b+1]
    # |hits/n_b - scores/n_b| x n_b/N, summed: each bin's |observed - predicted| over all entries
    gaps = np.bincount(which, weights=hits, minlength=bins) - np.bincount(which, weights=scores, minlength=bins)
    return float(np.abs(gaps).sum() / len(scores))


def brier(scores: np.ndarray, outcomes: np.ndarray) -> float:
    known = outcomes >= 0
    return float(np.mean((scores[known].astype(np.float64) - (outcomes[known] == 1)) ** 2)) if known.any() else math.nan


def nll(scores: np.ndarray, outcomes: np.ndarray) -> float:
    known = outcomes >= 0
    chosen = scores[known].astype(np.float64)
    likelihood = np.where(outcomes[known] == 1, chosen, 1 - chosen)
    return float(-np.log(np.clip(likelihood, 1e-12, 1)).mean()) if known.any() else math.nan


def binary_calibration(outcomes: np.ndarray, scores: np.ndarray) -> dict:
    """ece, ece_quantile, brier, nll of one binary problem (outcomes 1, 0, -1 unknown)."""
    return {"ece": calibration_error(scores, outcomes), "ece_quantile": calibration_error(scores, outcomes,
                                                                                          equal_mass=True),
            "brier": brier(scores, outcomes), "nll": nll(scores, outcomes)}


def multiclass_calibration(labels: np.ndarray, probs: np.ndarray) -> dict:
    """ece and ece_quantile of the top label (its probability against whether the argmax is right),
    ece_classwise (each class one-vs-rest, averaged), and the multi-class Brier score (squared
    distance to the one-hot truth, summed over classes) and NLL (cross-entropy)."""
    right = (probs.argmax(axis=1) == labels).astype(np.int64)
    confidence = probs.max(axis=1)
    one_hot = np.eye(probs.shape[1])[labels]
    picked = probs[np.arange(len(labels)), labels].astype(np.float64)
    return {"ece": calibration_error(confidence, right),
            "ece_quantile": calibration_error(confidence, right, equal_mass=True),
            "ece_classwise": float(np.mean([calibration_error(probs[:, k], (labels == k).astype(np.int64))
                                            for k in range(probs.shape[1])])),
            "brier": float(np.mean(((probs - one_hot) ** 2).sum(axis=1))) if len(labels) else math.nan,
            "nll": float(-np.log(np.clip(picked, 1e-12, 1)).mean()) if len(labels) else math.nan}


def multilabel_calibration(labels: np.ndarray, probs: np.ndarray, findings) -> dict:
    """Each finding's binary calibration over its known entries as `<metric>/<finding>`, and their
    mean over the findings where it is defined as `<metric>`."""
    per_finding = [binary_calibration(labels[:, k], probs[:, k]) for k in range(len(findings))]
    values = {}
    for metric in per_finding[0] if per_finding else ():
        column = np.array([one[metric] for one in per_finding])
        values[metric] = float(np.nanmean(column)) if not np.isnan(column).all() else math.nan
        values.update({f"{metric}/{name}": one[metric] for name, one in zip(findings, per_finding, strict=True)})
    return values


# ---------------------------------------------------------------------------------------------
# The same numbers on every row of resampled indices idx (B, N) at once (the bootstrap's intervals)


def resampled_error(scores: np.ndarray, outcomes: np.ndarray, idx: np.ndarray, bins: int = BINS,
                    equal_mass: bool = False) -> np.ndarray:
    """`calibration_error` on each row of indices idx: arrays (B,). The equal-mass edges are each
    row's quantiles of its known scores, as np.quantile computes them (rows grouped by how many
    entries they know: all of them, in the bootstrap's strata)."""
    scores, outcomes = scores[idx].astype(np.float64), outcomes[idx]
    known = outcomes >= 0
    counts = known.sum(axis=1)
    which = np.zeros(scores.shape, dtype=np.int64)
    if not equal_mass:
        which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], scores, side="right")
    for count in np.unique(counts[counts > 0]) if equal_mass else ():
        rows = np.flatnonzero(counts == count)
        ordered = np.sort(np.where(known[rows], scores[rows], np.inf), axis=1)[:, :count]
        inner = np.quantile(ordered, np.linspace(0, 1, bins + 1), axis=1).T[:, 1:-1]  # (rows, bins - 1)
        which[rows] = (scores[rows][:, :, None] >= inner[:, None, :]).sum(axis=2)
    flat = which + bins * np.arange(len(idx))[:, None]
    hits = np.bincount(flat.ravel(), weights=(known & (outcomes == 1)).ravel(), minlength=bins * len(idx))
    mass = np.bincount(flat.ravel(), weights=np.where(known, scores, 0).ravel(), minlength=bins * len(idx))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs((hits - mass).reshape(len(idx), bins)).sum(axis=1) / np.where(counts > 0, counts, np.nan)


def resampled_binary(outcomes: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> dict:
    """`binary_calibration` on each row of indices idx: arrays (B,)."""
    known, hit = outcomes[idx] >= 0, outcomes[idx] == 1
    chosen = scores[idx].astype(np.float64)
    likelihood = np.clip(np.where(hit, chosen, 1 - chosen), 1e-12, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        counts = np.where(known.any(axis=1), known.sum(axis=1), np.nan)
        return {"ece": resampled_error(scores, outcomes, idx),
                "ece_quantile": resampled_error(scores, outcomes, idx, equal_mass=True),
                "brier": np.where(known, (chosen - hit) ** 2, 0).sum(axis=1) / counts,
                "nll": -np.where(known, np.log(likelihood), 0).sum(axis=1) / counts}


def resampled_multiclass(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> dict:
    """`multiclass_calibration` on each row of indices idx: arrays (B,)."""
    right = (probs.argmax(axis=1) == labels).astype(np.int64)
    confidence = probs.max(axis=1)
    one_hot = np.eye(probs.shape[1])[labels]
    picked = probs[np.arange(len(labels)), labels].astype(np.float64)
    classwise = [resampled_error(probs[:, k], (labels == k).astype(np.int64), idx) for k in range(probs.shape[1])]
    return {"ece": resampled_error(confidence, right, idx),
            "ece_quantile": resampled_error(confidence, right, idx, equal_mass=True),
            "ece_classwise": np.mean(classwise, axis=0),
            "brier": ((probs.astype(np.float64) - one_hot) ** 2).sum(axis=1)[idx].mean(axis=1),
            "nll": -np.log(np.clip(picked, 1e-12, 1))[idx].mean(axis=1)}


def resampled_multilabel(labels: np.ndarray, probs: np.ndarray, idx: np.ndarray, findings) -> dict:
    """`multilabel_calibration` on each row of indices idx: arrays (B,)."""
    per_finding = [resampled_binary(labels[:, k], probs[:, k], idx) for k in range(len(findings))]
    values = {}
    for metric in per_finding[0] if per_finding else ():
        stacked = np.stack([one[metric] for one in per_finding])
        defined = ~np.isnan(stacked)
        with np.errstate(invalid="ignore"):
            values[metric] = np.where(defined, stacked, 0).sum(axis=0) / defined.sum(axis=0)
        values.update({f"{metric}/{name}": one[metric] for name, one in zip(findings, per_finding, strict=True)})
    return values


def fit_temperature(logits: np.ndarray, labels: np.ndarray, task) -> float | list[float]:
    """The temperature (multi-label: one per finding) minimising the task's loss (cross-entropy;
    masked binary cross-entropy, whose findings are independent) of logits / T, by LBFGS over
    log T from T = 1, in float64.

    Where validation answers every image right (multi-label: every entry of a finding), the loss
    keeps falling as T -> 0 and has no minimum: T would make every probability 0 or 1, and the
    ties that creates in float32 would change AUROC. Such a temperature stays 1 (logged)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    log_t = torch.zeros(task.temperatures, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = task.loss(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = log_t.detach().exp()
    temperature = fitted.clamp(*TEMPERATURE_RANGE)
    if (fitted > TEMPERATURE_RANGE[1]).any():
        log.warning("temperature scaling: the validation NLL keeps falling as T grows, up to T = %g, where every "
                    "probability is about 1/2: the logits lean to one side more than they are over-confident, "
                    "which no temperature fixes", TEMPERATURE_RANGE[1])
    unbounded = task.all_right(logits, labels)
    if unbounded.any():
        kept = [name for name, flag in zip(task.classes, unbounded.tolist(), strict=False) if flag]
        what = f"entry of {', '.join(kept)}" if task.multilabel else "image"
        log.warning("temperature scaling: validation answers every %s right, so no temperature minimises its "
                    "NLL (T -> 0 would make every probability 0 or 1); it stays 1", what)
    temperature = torch.where(unbounded, torch.ones_like(temperature), temperature)
    return temperature.tolist() if task.multilabel else temperature.item()


# trainer.calibration: what each setting fits on the validation logits (None: nothing)
CALIBRATIONS = {"none": None, "temperature": fit_temperature}

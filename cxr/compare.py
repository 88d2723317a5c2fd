"""Which differences between runs are real: a run against a reference run (in a sweep's report,
the chosen one), both scored on the same test images, read back from their test_predictions.csv.

    diff/auroc, diff/balanced_acc   the run minus the reference, with a paired bootstrap 95%
                                    interval: both runs scored on each resample of the same image
                                    indices (stratified as the runs' own intervals), so what the two
                                    share (which images are hard) cancels out of the difference
    p                               DeLong's test of the AUROC difference where a run's AUROC is one
                                    ROC curve (binary runs): DeLong, DeLong & Clarke-Pearson (1988),
                                    from the placement values of the two correlated curves. Where it
                                    is a mean over curves (multi-class, multi-label), the paired
                                    bootstrap test: z = difference / standard deviation of its
                                    resamples (as pROC's roc.test(method="bootstrap")). Multi-label
                                    runs also get DeLong per finding (`p/<finding>`).
    p_holm                          Holm's step-down adjustment across the comparisons made together
    verdict                         better / worse where p_holm < ALPHA (by the sign of diff/auroc),
                                    else within noise

Runs tested on other images, or on the same images with other labels, are not compared: a
difference between them would mix the models with the test sets.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import stats
from scipy.stats import rankdata

from cxr import metrics, results
from cxr.task import Task

RESAMPLES = 1000
ALPHA = 0.05


class CompareError(Exception):
    """Two runs that cannot be compared, and why (one line)."""


@dataclass(frozen=True)
class RunPredictions:
    """A finished run's test split as its test_predictions.csv holds it, and its threshold."""

    task: Task
    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    threshold: float | list[float]


class DeLong(NamedTuple):
    difference: float  # AUROC of the first scores minus that of the second
    z: float
    p: float  # two-sided


def read_test_predictions(job_dir: Path, record: dict) -> RunPredictions:
    """The run in `job_dir` (its result.json is `record`); CompareError when it has none to compare."""
    path = Path(job_dir) / results.PREDICTIONS_FILE
    if record.get("status") != results.OK:
        raise CompareError(f"status {record.get('status')}")
    if not path.exists():
        raise CompareError(f"no {results.PREDICTIONS_FILE}")
    data = record["data"]
    task = Task.of(data["classes"], multilabel=bool(data.get("multilabel")))
    paths, probs, labels = results.read_predictions(path, task)
    return RunPredictions(task, paths, labels, probs, record["threshold"])


def aligned(run: RunPredictions, reference: RunPredictions) -> RunPredictions:
    """`run` in the reference's image order; CompareError unless both were tested on the same
    images with the same labels and classes."""
    if run.task != reference.task:
        raise CompareError(f"other classes ({', '.join(run.task.classes)})")
    if sorted(run.paths) != sorted(reference.paths):
        common = len(set(run.paths) & set(reference.paths))
        raise CompareError(f"tested on other images ({len(run.paths)} vs {len(reference.paths)}, {common} in common)")
    position = {path: i for i, path in enumerate(run.paths)}
    order = np.array([position[path] for path in reference.paths], dtype=np.int64)
    if not np.array_equal(run.labels[order], reference.labels):
        raise CompareError("the same test images with other labels")
    return replace(run, paths=reference.paths, labels=reference.labels, probs=run.probs[order])


def delong(truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLong:
    """DeLong's test of AUROC(scores_a) - AUROC(scores_b) on the same cases (truth: True for a
    positive). Each positive's placement V10 is the share of negatives it outranks (ties half),
    each negative's V01 the share of positives that outrank it; their covariances between the two
    scores, S10 and S01, give var(difference) = (S10 contrast)/m + (S01 contrast)/n. Placements
    from mid-ranks (Sun & Xu 2014): O(n log n)."""
    truth = np.asarray(truth, dtype=bool)
    m, n = int(truth.sum()), int((~truth).sum())
    v10, v01 = [], []
    for scores in (scores_a, scores_b):
        scores = np.asarray(scores, dtype=np.float64)
        ranks = rankdata(scores)
        v10.append((ranks[truth] - rankdata(scores[truth])) / n)
        v01.append(1 - (ranks[~truth] - rankdata(scores[~truth])) / m)
    difference = float(np.mean(v10[0]) - np.mean(v10[1]))
    if min(m, n) < 2:  # no covariance from one case
        return DeLong(difference, math.nan, math.nan)
    contrast = np.array([1.0, -1.0])
    variance = contrast @ np.cov(v10) @ contrast / m + contrast @ np.cov(v01) @ contrast / n
    return DeLong(difference, *z_test(difference, math.sqrt(max(variance, 0.0))))


def z_test(difference: float, sd: float) -> tuple[float, float]:
    """z and the two-sided normal p of a difference with this standard error; identical scores
    (sd 0, no difference): z 0, p 1."""
    if sd == 0:
        return (0.0, 1.0) if difference == 0 else (math.nan, math.nan)
    z = difference / sd
    return z, float(2 * stats.norm.sf(abs(z)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given: the k-th smallest of m
    times (m - k + 1), never below an earlier one, at most 1. NaN stays NaN and does not count."""
    p = np.asarray(p_values, dtype=np.float64)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    adjusted = np.full(len(p), math.nan)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted.tolist()


def paired_difference(run: RunPredictions, reference: RunPredictions, resamples: int = RESAMPLES,
                      seed: int = 0) -> dict:
    """`run` minus `reference` on the same test images: diff/auroc and diff/balanced_acc with their
    paired bootstrap intervals (`<name>_ci95`), p and which test gave it (`p_test`), and per
    finding (multi-label) diff/auroc/<finding> and its DeLong p/<finding>."""
    run = aligned(run, reference)
    task, labels = reference.task, reference.labels
    # row 0: the images as they are (the point estimate); then the resamples, the same for both runs
    idx = np.vstack([np.arange(len(labels))[None], metrics.resample_indices(task.strata(labels), resamples, seed)])
    ours, theirs = (task.resampled_metrics(labels, one.probs, one.threshold, idx, with_calibration=False)
                    for one in (run, reference))
    compared = {}
    for name in ("auroc", "balanced_acc"):
        differences = ours[name] - theirs[name]
        compared[f"diff/{name}"] = float(differences[0])
        defined = not np.isnan(differences[1:]).any()
        compared[f"diff/{name}_ci95"] = tuple(np.percentile(differences[1:], [2.5, 97.5]).tolist()) if defined else None
    run_curves, reference_curves = task.roc_curves(labels, run.probs), task.roc_curves(labels, reference.probs)
    tests = {name: delong(truth, scores, reference_scores)
             for (name, truth, scores), (_, _, reference_scores) in zip(run_curves, reference_curves, strict=True)}
    if task.kind == "binary" and tests:
        compared.update(p=next(iter(tests.values())).p, p_test="DeLong")
    else:
        bootstrapped = ours["auroc"][1:] - theirs["auroc"][1:]
        sd = float(np.std(bootstrapped, ddof=1)) if not np.isnan(bootstrapped).any() else math.nan
        compared.update(p=z_test(compared["diff/auroc"], sd)[1], p_test="bootstrap")
    if task.multilabel:
        for name, test in tests.items():
            compared.update({f"diff/auroc/{name}": test.difference, f"p/{name}": test.p})
    return compared


def verdict(difference: float, p_holm: float) -> str:
    if math.isnan(p_holm):
        return "untested"
    if p_holm >= ALPHA:
        return "within noise"
    return "better" if difference > 0 else "worse"


def differences(pairs: list[tuple[tuple[Path, dict], tuple[Path, dict]]], resamples: int = RESAMPLES) -> list[dict]:
    """For each (run, reference) pair of (job dir, result.json): `paired_difference`, with p (and
    each finding's p) Holm-adjusted across the pairs as `p_holm` (`p_holm/<finding>`) and the
    verdict; a pair that cannot be compared: {"verdict": "not compared: <why>"}."""
    loaded = {job_dir: _loaded(job_dir, record) for pair in pairs for job_dir, record in pair}
    compared = []
    for (run, _), (reference, _) in pairs:
        if isinstance(loaded[reference], CompareError):
            compared.append({"verdict": f"not compared: the reference has {loaded[reference]}"})
        elif isinstance(loaded[run], CompareError):
            compared.append({"verdict": f"not compared: {loaded[run]}"})
        else:
            try:
                compared.append(paired_difference(loaded[run], loaded[reference], resamples))
            except CompareError as error:
                compared.append({"verdict": f"not compared: {error}"})
    for key in dict.fromkeys(k for one in compared for k in one if k == "p" or k.startswith("p/")):
        tested = [one for one in compared if key in one]
        for one, adjusted in zip(tested, holm([one[key] for one in tested]), strict=True):
            one[key.replace("p", "p_holm", 1)] = adjusted
    for one in compared:
        if "p_holm" in one:
            one["verdict"] = verdict(one["diff/auroc"], one["p_holm"])
    return compared


def _loaded(job_dir: Path, record: dict) -> RunPredictions | CompareError:
    try:
        return read_test_predictions(job_dir, record)
    except CompareError as error:
        return error

"""Which differences are real (cxr.compare): DeLong against its O(n^2) definition and a published
example, Holm by hand, the paired bootstrap against scikit-learn, and the sweep report's section."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr import aggregate, metrics, results
from cxr.compare import CompareError, RunPredictions, delong, holm, paired_difference
from cxr.task import Task
from tests.test_sweep import read_csv, read_tables, write_result

BINARY = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)
THREE = Task.of(["BACTERIA", "NORMAL", "VIRUS"], multilabel=False)
FINDINGS = Task.of(["Effusion", "Nodule", "Edema"], multilabel=True)

# pROC's aSAH data set (Turck et al. 2010, Intensive Care Medicine 36:107; shipped with pROC, Robin et
# al. 2011, BMC Bioinformatics 12:77): 113 patients after subarachnoid haemorrhage, outcome Good or
# Poor, and three predictors of a poor outcome
OUTCOME = ("GGGGPPGPGGPGPPGGPGPPPGPGGGGGGGGGPGGPPGPPGGGGGGGGGPPGGGPGGGPG"
           "PGGPPPGPPGPPPPGGGPPGPGGGGGGPGGGGGGGGGGGGPPPPPPGGGPGGG")
WFNS = """1 1 1 1 3 2 5 4 1 2 5 2 5 5 1 2 5 2 2 5 2 1 1 1 1 2 1 2 1 1 3 4 2 1 4 5 4 1 4 2 5 5 1 1 2 4 1 1 2 5
5 2 1 2 5 1 2 2 2 1 5 1 1 2 5 2 1 4 5 2 4 4 1 4 1 2 1 4 2 1 2 3 2 4 2 1 4 5 1 1 5 4 2 2 1 1 1 3 1 2
5 2 2 5 5 5 2 4 4 5 1 1 1"""
S100B = """0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07 0.33 0.09
0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09 0.96 0.25 0.5
0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.1 0.14 0.15 0.07 0.06 0.77
0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09 0.27 0.71 0.08 0.26 0.08 0.16 0.09 0.13 0.1 0.08 0.11
0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15 0.08 0.14 0.1 0.07 0.04 0.19 0.56
0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48"""
NDKA = """3.01 8.54 8.09 10.42 17.4 12.75 6.0 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6 16.11
32.37 54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21 5.03 14.04
21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 3.87 9.44 7.66 12.98
419.19 27.19 22.27 9.95 21.22 11.73 10.4 58.83 6.39 11.09 12.22 13.67 17.21 22.63 12.9 9.7 21.57
8.23 72.57 15.54 10.51 10.6 14.57 5.19 9.63 4.61 21.48 17.3 12.71 9.44 11.07 19.46 10.83 5.37 11.97
7.75 9.83 10.55 28.49 8.53 12.57 12.9 46.83 11.68 12.67 9.01 9.57 34.06 11.72 14.26 47.61 11.67
24.58 10.33 13.87 15.89 22.43 6.79 13.45"""
ASAH = {name: np.array(values.split(), dtype=float) for name, values in (("wfns", WFNS), ("s100b", S100B),
                                                                        ("ndka", NDKA))}
POOR = np.array([outcome == "P" for outcome in OUTCOME])


def structural_components(truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) by their definition, O(n^2): psi(X, Y) = 1, 1/2, 0 for a positive's score
    above, equal to, below a negative's; V10 (per positive) and V01 (per negative) its means;
    S10, S01 their 2x2 covariances between the two scores; z = difference / sqrt(var)."""
    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10, v01 = [], []
    for scores in (scores_a, scores_b):
        positives, negatives = scores[truth], scores[~truth]
        v10.append([np.mean([psi(x, y) for y in negatives]) for x in positives])
        v01.append([np.mean([psi(x, y) for x in positives]) for y in negatives])
    s10, s01 = np.cov(v10), np.cov(v01)
    m, n = truth.sum(), (~truth).sum()
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    z = (np.mean(v10[0]) - np.mean(v10[1])) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2))  # two-sided normal p


def test_delong_matches_the_structural_components_computed_directly():
    rng = np.random.default_rng(3)
    truth = rng.random(90) < 0.4
    # rounded to one decimal: many ties, within each model and across the classes
    scores_a = np.round(truth * 0.8 + rng.normal(0, 0.6, 90), 1)
    scores_b = np.round(scores_a * 0.5 + truth * 0.3 + rng.normal(0, 0.6, 90), 1)

    z, p = structural_components(truth, scores_a, scores_b)
    test = delong(truth, scores_a, scores_b)

    assert test.z == pytest.approx(z, rel=1e-10) and test.p == pytest.approx(p, rel=1e-9)
    assert test.difference == pytest.approx(roc_auc_score(truth, scores_a) - roc_auc_score(truth, scores_b), abs=1e-12)
    assert delong(truth, scores_b, scores_a).z == pytest.approx(-z, rel=1e-10)
    assert delong(truth, scores_a, scores_a) == (0.0, 0.0, 1.0)  # the same scores: no difference at all


@pytest.mark.parametrize("first, second, z, p", [
    # pROC's test suite (tests/testthat/test-roc.test.R), roc.test(roc1, roc2) with its default DeLong
    # method on aSAH$outcome: published values, to all the digits pROC states
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054),
])
def test_delong_reproduces_proc_on_its_asah_example(first, second, z, p):
    # pROC: AUC of wfns 0.823678861788618, of ndka 0.611957994579946 (the data are the ones it used)
    assert roc_auc_score(POOR, ASAH["wfns"]) == pytest.approx(0.823678861788618, abs=1e-12)
    assert roc_auc_score(POOR, ASAH["ndka"]) == pytest.approx(0.611957994579946, abs=1e-12)

    test = delong(POOR, ASAH[first], ASAH[second])

    assert test.z == pytest.approx(z, rel=1e-10) and test.p == pytest.approx(p, rel=1e-10)


def test_holm_adjusts_as_worked_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # an untested comparison (NaN) stays NaN and does not count in m: 0.02 x 2, then 0.6 x 1
    adjusted = holm([0.6, math.nan, 0.02])
    assert adjusted[0] == pytest.approx(0.6) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.7, 0.6]) == [1.0, 1.0]  # 0.6 x 2 = 1.2, capped at 1; 0.7 is raised to it
    assert holm([]) == []


def binary_probs(p: np.ndarray) -> np.ndarray:
    return np.stack([1 - p, p], axis=1).astype(np.float32)


def example(task: Task, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, object]:
    """Labels, probabilities and a threshold of a run of `task` on n images that learned something."""
    rng = np.random.default_rng(seed)
    if task.multilabel:
        labels = rng.choice([0, 1, -1], size=(n, len(task.classes)), p=[0.55, 0.3, 0.15])
        probs = np.clip(0.35 * (labels == 1) + 0.65 * rng.random(labels.shape), 0, 1).astype(np.float32)
        return labels, probs, [0.4, 0.5, 0.6]
    labels = rng.integers(0, len(task.classes), n)
    logits = 1.5 * np.eye(len(task.classes))[labels] + rng.normal(0, 1, (n, len(task.classes)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs.astype(np.float32), 0.45


@pytest.mark.parametrize("task", [BINARY, THREE, FINDINGS], ids=["binary", "multiclass", "multilabel"])
def test_resampled_metrics_equal_the_tasks_metrics_on_every_resample(task):
    labels, probs, threshold = example(task, 60, seed=1)
    idx = metrics.resample_indices(task.strata(labels), 25, seed=0)

    resampled = task.resampled_metrics(labels, probs, threshold, idx)

    for row, indices in enumerate(idx):  # Task.metrics: scikit-learn's, one resample at a time
        expected = task.metrics(labels[indices], probs[indices], threshold)
        for name, values in resampled.items():
            assert values[row] == pytest.approx(expected[name], abs=1e-12, nan_ok=True), (name, row)
    assert all(len(np.unique(labels[row])) == len(np.unique(labels)) for row in idx)  # stratified


def predictions(task: Task, labels, probs, threshold, paths=None) -> RunPredictions:
    paths = paths if paths is not None else [f"test/{i:03d}.jpeg" for i in range(len(labels))]
    return RunPredictions(task, list(paths), labels, probs, threshold)


def test_a_paired_difference_scores_both_runs_on_the_same_images():
    labels, probs, _ = example(BINARY, 120, seed=2)
    rng = np.random.default_rng(5)
    worse = binary_probs(np.clip(probs[:, 1] + rng.normal(0, 0.25, 120), 0, 1))
    chosen, other = predictions(BINARY, labels, probs, 0.5), predictions(BINARY, labels, worse, 0.45)

    compared = paired_difference(other, chosen, resamples=200)

    expected = roc_auc_score(labels, worse[:, 1]) - roc_auc_score(labels, probs[:, 1])
    assert compared["diff/auroc"] == pytest.approx(expected, abs=1e-12)
    low, high = compared["diff/auroc_ci95"]
    assert low < expected < high and high - low > 0.01
    assert compared["p_test"] == "DeLong"
    assert compared["p"] == pytest.approx(structural_components(labels == 1, worse[:, 1], probs[:, 1])[1], rel=1e-6)
    # balanced accuracy at each run's own threshold, as its result.json reports it
    expected = BINARY.metrics(labels, worse, 0.45)["balanced_acc"] - BINARY.metrics(labels, probs, 0.5)["balanced_acc"]
    assert compared["diff/balanced_acc"] == pytest.approx(expected, abs=1e-12)
    # the rows of a CSV need not be in the same order: images are matched by path
    order = rng.permutation(120)
    shuffled = predictions(BINARY, labels[order], worse[order], 0.45, np.array(other.paths)[order])
    assert paired_difference(shuffled, chosen, resamples=200) == compared


def test_runs_tested_on_other_images_or_labels_are_not_compared():
    labels, probs, _ = example(BINARY, 40, seed=2)
    chosen = predictions(BINARY, labels, probs, 0.5)
    elsewhere = predictions(BINARY, labels, probs, 0.5, [f"other/{i}.jpeg" for i in range(40)])
    with pytest.raises(CompareError, match=r"tested on other images \(40 vs 40, 0 in common\)"):
        paired_difference(elsewhere, chosen)
    with pytest.raises(CompareError, match="the same test images with other labels"):
        paired_difference(predictions(BINARY, 1 - labels, probs, 0.5), chosen)
    with pytest.raises(CompareError, match="other classes"):
        paired_difference(predictions(THREE, labels, np.hstack([probs, probs[:, :1]]), 0.5), chosen)


def test_multilabel_differences_have_a_delong_p_per_finding_and_a_bootstrap_p_for_the_mean():
    labels, probs, threshold = example(FINDINGS, 80, seed=4)
    other = np.clip(probs + np.random.default_rng(1).normal(0, 0.2, probs.shape), 0, 1).astype(np.float32)

    compared = paired_difference(predictions(FINDINGS, labels, other, threshold),
                                 predictions(FINDINGS, labels, probs, threshold), resamples=200)

    assert compared["p_test"] == "bootstrap" and 0 <= compared["p"] <= 1
    for k, name in enumerate(FINDINGS.classes):
        known = labels[:, k] >= 0
        truth = labels[known, k] == 1
        assert compared[f"diff/auroc/{name}"] == pytest.approx(
            roc_auc_score(truth, other[known, k]) - roc_auc_score(truth, probs[known, k]), abs=1e-12)
        assert compared[f"p/{name}"] == pytest.approx(structural_components(truth, other[known, k], probs[known, k])[1],
                                                      rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The sweep report's section, on hand-written runs with their test predictions


def write_job(job_dir, variant: str, seed: int, val_auroc: float, labels, p_positive, paths=None) -> None:
    """A finished binary job: result.json (test_sweep's, with its data and threshold) and its
    test_predictions.csv."""
    write_result(job_dir, variant, seed, test_acc=0.9, val_auroc=val_auroc)
    record = json.loads((job_dir / "result.json").read_text())
    record["data"].update(classes=list(BINARY.classes), multilabel=False, test=len(labels))
    record["threshold"] = 0.5
    results.write(job_dir, record)
    probs = binary_probs(p_positive)
    paths = paths or [f"test/{i:03d}.jpeg" for i in range(len(labels))]
    rows = [BINARY.prediction_row(path, p, d, truth=y)
            for path, p, d, y in zip(paths, probs, BINARY.decide(probs, 0.5), labels, strict=True)]
    results.write_predictions(rows, BINARY.prediction_columns(with_truth=True), job_dir / results.PREDICTIONS_FILE)


def test_the_report_compares_every_job_with_the_chosen_one(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.6).astype(int)
    good = np.clip(0.3 * labels + 0.7 * rng.random(300), 0, 1)
    weak = np.clip(0.1 * labels + 0.9 * rng.random(300), 0, 1)
    close = np.clip(good + rng.normal(0, 0.005, 300), 0, 1)
    write_job(tmp_path / "0_experiment=resultset1", "resultset1", 0, 0.95, labels, good)  # the chosen one
    write_job(tmp_path / "1_experiment=resultset2", "resultset2", 0, 0.90, labels, weak)
    write_job(tmp_path / "2_experiment=resultset3", "resultset3", 0, 0.90, labels, close)
    write_job(tmp_path / "3_experiment=resultset4", "resultset4", 0, 0.90, labels, good,
              paths=[f"elsewhere/{i}.jpeg" for i in range(300)])

    aggregate.aggregate(tmp_path)

    text = (tmp_path / "results.md").read_text()
    assert "intervals that do not overlap" not in text  # the old rule is gone
    assert "## Differences from the chosen row" in text and "Each job against **resultset1**" in text
    jobs, differences = read_tables(tmp_path / "results.md")
    assert [row["Model"] for row in differences] == [row["Model"] for row in jobs]
    verdicts = [row["Verdict"] for row in differences]
    assert verdicts == ["reference", "worse", "within noise",
                        "not compared: tested on other images (300 vs 300, 0 in common)"]
    # DeLong from its definition, Holm by hand over the two comparisons made
    p_weak = structural_components(labels == 1, weak, good)[1]
    p_close = structural_components(labels == 1, close, good)[1]
    rows = read_csv(tmp_path / "results.csv")
    assert [float(rows[i]["p"]) for i in (1, 2)] == pytest.approx([p_weak, p_close], rel=1e-5)
    smaller, larger = sorted([p_weak, p_close])
    adjusted = {smaller: 2 * smaller, larger: max(2 * smaller, larger)}
    assert [float(rows[i]["p_holm"]) for i in (1, 2)] == pytest.approx([adjusted[p_weak], min(1, adjusted[p_close])],
                                                                        rel=1e-5)
    assert float(rows[1]["diff/auroc"]) == pytest.approx(roc_auc_score(labels, weak) - roc_auc_score(labels, good),
                                                         abs=1e-6)
    assert float(rows[1]["diff/auroc_ci95_high"]) < 0 < float(rows[2]["diff/auroc_ci95_high"])
    assert [row["compared_with"] for row in rows] == ["", "resultset1", "resultset1", "resultset1"]
    assert differences[1]["ΔAUROC"].startswith("-") and differences[1]["Test"] == "DeLong"


def test_with_seeds_each_job_is_compared_with_the_same_seed_of_the_chosen_variant(tmp_path):
    rng = np.random.default_rng(1)
    labels = (rng.random(200) < 0.5).astype(int)
    aurocs = {}
    for job, (variant, seed) in enumerate((v, s) for v in ("resultset1", "resultset2") for s in (0, 1)):
        strength = 0.45 if variant == "resultset1" else 0.15 + 0.05 * seed
        scores = np.clip(strength * labels + (1 - strength) * rng.random(200), 0, 1)
        aurocs[variant, seed] = roc_auc_score(labels, scores)
        write_job(tmp_path / f"{job}_experiment={variant},seed={seed}", variant, seed,
                  0.95 if variant == "resultset1" else 0.9, labels, scores)

    aggregate.aggregate(tmp_path)

    variants, jobs, differences, over_seeds = read_tables(tmp_path / "results.md")
    assert [row["Compared With"] for row in differences] == ["—", "—", "resultset1 seed=0", "resultset1 seed=1"]
    assert [row["Verdict"] for row in differences] == ["reference", "reference", "worse", "worse"]
    per_seed = [aurocs["resultset2", seed] - aurocs["resultset1", seed] for seed in (0, 1)]
    mean, sd = np.mean(per_seed), np.std(per_seed, ddof=1)
    assert over_seeds[1]["ΔAUROC over Seeds"] == f"{mean:+.3f} ± {sd:.3f}"
    assert over_seeds[1]["Seeds Compared"] == "2" and over_seeds[1]["Seed Verdicts"] == "2 worse"
    assert [row["Verdict"] for row in over_seeds] == ["reference", "worse"]

"""Metrics against scikit-learn on hand-made predictions, intervals, and the threshold's origin."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

import cxr.train
from cxr import results
from cxr.batches import eval_batches, preprocess
from cxr.checkpoint import load_classifier
from cxr.data import load_dataset
from cxr.engine import evaluate
from cxr.metrics import percentile_intervals, resample_indices
from cxr.task import Task

# ten images, 0 = NORMAL, 1 = PNEUMONIA, and P(PNEUMONIA)
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P_POS = np.array([0.10, 0.40, 0.55, 0.20, 0.90, 0.35, 0.60, 0.80, 0.45, 0.70])
BINARY = np.stack([1 - P_POS, P_POS], axis=1)

# three classes (NORMAL / BACTERIA / VIRUS), every class present, some mistakes
LABELS3 = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
PROBS3 = np.array([
    [0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.2, 0.6, 0.2],
    [0.3, 0.3, 0.4], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3],
    [0.3, 0.1, 0.6], [0.2, 0.2, 0.6],
])


# the positive class is PNEUMONIA wherever it sits among the classes
TASKS = {1: Task.of(["NORMAL", "PNEUMONIA"], multilabel=False), 0: Task.of(["PNEUMONIA", "NORMAL"], multilabel=False)}
TASK3 = Task.of(["BACTERIA", "NORMAL", "VIRUS"], multilabel=False)


def classification_metrics(labels, probs, threshold, task=TASKS[1]) -> dict:
    """The task's scalar metrics and its confusion matrix."""
    return {**task.metrics(labels, probs, threshold), "confusion": task.confusion(labels, probs, threshold)}


def sklearn_binary(labels, probs, threshold, positive):
    preds = np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    negative = 1 - positive
    return preds, {
        "acc": accuracy_score(labels, preds),
        "balanced_acc": balanced_accuracy_score(labels, preds),
        "auroc": roc_auc_score(labels == positive, probs[:, positive]),
        "sensitivity": recall_score(labels, preds, pos_label=positive, zero_division=np.nan),
        "specificity": recall_score(labels, preds, pos_label=negative, zero_division=np.nan),
        "precision": precision_score(labels, preds, pos_label=positive, zero_division=np.nan),
        "f1": f1_score(labels, preds, pos_label=positive, zero_division=np.nan),
    }


def assert_same(ours: dict, reference: dict) -> None:
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, nan_ok=True), name


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.65])
@pytest.mark.parametrize("positive", [1, 0])
def test_binary_metrics_match_sklearn(threshold, positive):
    labels = LABELS if positive == 1 else 1 - LABELS
    probs = BINARY if positive == 1 else BINARY[:, ::-1]
    preds, reference = sklearn_binary(labels, probs, threshold, positive)
    ours = classification_metrics(labels, probs, threshold, TASKS[positive])
    assert_same(ours, reference)
    assert ours["confusion"] == confusion_matrix(labels, preds, labels=[0, 1]).tolist()


def test_threshold_changes_the_decisions():
    # 0.5: three mistakes (0.55 for a NORMAL, 0.35 and 0.45 for PNEUMONIA); 0.3 rescues both
    assert classification_metrics(LABELS, BINARY, 0.5)["acc"] == pytest.approx(0.7)
    assert classification_metrics(LABELS, BINARY, 0.3)["sensitivity"] == 1.0


def test_three_class_metrics_are_sklearn_macro_averages():
    preds = PROBS3.argmax(axis=1)
    assert TASK3.kind == "multiclass" and TASK3.positive == 2
    ours = classification_metrics(LABELS3, PROBS3, 0.5, TASK3)
    # specificity of class k: the recall of "not k" when k is taken against the rest
    specificity = np.mean([recall_score(LABELS3 != k, preds != k) for k in range(3)])
    assert_same(ours, {
        "acc": accuracy_score(LABELS3, preds),
        "balanced_acc": balanced_accuracy_score(LABELS3, preds),
        "auroc": roc_auc_score(LABELS3, PROBS3, multi_class="ovr", average="macro"),
        "sensitivity": recall_score(LABELS3, preds, average="macro"),
        "specificity": specificity,
        "precision": precision_score(LABELS3, preds, average="macro"),
        "f1": f1_score(LABELS3, preds, average="macro"),
    })
    assert ours["confusion"] == confusion_matrix(LABELS3, preds).tolist()


@pytest.mark.parametrize("answer", [0, 1])
def test_degenerate_all_one_class_prediction(answer):
    """A collapsed model: every image gets the same answer."""
    probs = np.tile([1.0 - answer, float(answer)], (len(LABELS), 1))
    _, reference = sklearn_binary(LABELS, probs, 0.5, 1)
    ours = classification_metrics(LABELS, probs, 0.5)
    assert_same(ours, reference)
    assert ours["auroc"] == 0.5  # one score for everything ranks nothing
    pneumonia_rate = TASKS[1].majority_rate(LABELS)
    assert ours["acc"] == pytest.approx(pneumonia_rate if answer == 1 else 1 - pneumonia_rate)
    assert ours["sensitivity"] == answer and ours["specificity"] == 1 - answer
    # never answering PNEUMONIA leaves precision undefined: NaN, not a made-up 0
    assert math.isnan(ours["precision"]) == (answer == 0)


def test_one_class_labels_give_nan_auroc_written_as_null(tmp_path):
    labels = np.ones(len(LABELS), dtype=int)
    metrics = classification_metrics(labels, BINARY, 0.5)
    assert math.isnan(metrics["auroc"]) and math.isnan(metrics["specificity"])
    assert metrics["sensitivity"] == recall_score(labels, BINARY.argmax(1))
    results.write(tmp_path, {"metrics": metrics})
    written = json.loads((tmp_path / "result.json").read_text())["metrics"]
    assert written["auroc"] is None and written["specificity"] is None
    assert written["acc"] == pytest.approx(metrics["acc"])


def test_bootstrap_intervals_hold_the_estimate_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.6).astype(int)
    p = np.clip(0.35 * labels + 0.65 * rng.random(200), 0, 1)
    probs = np.stack([1 - p, p], axis=1)
    task = TASKS[1]
    point = task.metrics(labels, probs, 0.5)
    intervals = task.intervals(labels, probs, 0.5, resamples=200, seed=0)
    assert set(intervals) == set(point)
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high, name
        assert high - low > 0.01, name  # a real spread, not a copy of the estimate
    assert task.intervals(labels, probs, 0.5, resamples=200, seed=0) == intervals
    assert task.intervals(labels, probs, 0.5, resamples=200, seed=1) != intervals
    assert task.intervals(labels, probs, 0.5, resamples=0) == {}


def test_three_class_bootstrap_matches_an_independent_stratified_bootstrap():
    """300 images of three classes (60/100/140) of unequal difficulty (recall about 0.9, 0.6 and
    0.45, so macro recall is not accuracy): cxr's 95% intervals of accuracy, macro recall
    (sensitivity) and macro F1 against a bootstrap written here (NumPy resamples within each
    class, scikit-learn's metrics, other random draws). The endpoints agree within Monte Carlo
    error (<= 0.007 over three seeds of the reference); a micro average, a copy of the estimate or
    intervals of another metric are off by several hundredths."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 100, 140])
    logits = rng.normal(0, 1, (300, 3)) + np.array([2.5, 1.2, 0.6])[labels, None] * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    decisions = probs.argmax(1)
    scores = {"acc": lambda y, d: accuracy_score(y, d),
              "sensitivity": lambda y, d: recall_score(y, d, average="macro"),
              "f1": lambda y, d: f1_score(y, d, average="macro")}
    draws = {name: [] for name in scores}
    for _ in range(1000):
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == k), (labels == k).sum()) for k in range(3)])
        for name, score in scores.items():
            draws[name].append(score(labels[idx], decisions[idx]))
    intervals = TASK3.intervals(labels, probs, 0.5, resamples=1000, seed=0)
    point = TASK3.metrics(labels, probs, 0.5)
    assert point["sensitivity"] - point["acc"] > 0.03  # the macro mean is not the micro one here
    for name, values in draws.items():
        low, high = intervals[name]
        assert low < point[name] < high, name
        assert [low, high] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=0.012), name


def test_bootstrap_interval_is_the_95_percent_one_of_a_known_distribution():
    """The mean of 400 values, 160 of them 1: its resampled mean is Binomial(400, 0.4) / 400, whose
    2.5% and 97.5% points scipy gives exactly (0.3525 and 0.4475). 4,000
    resamples put the endpoints within ~0.002; a 90% interval would be 0.008 inside them."""
    from scipy.stats import binom

    values = np.repeat([1.0, 0.0], [160, 240])
    intervals = percentile_intervals({"mean": values[resample_indices([np.arange(400)], 4000, seed=0)].mean(axis=1)})
    exact = binom.ppf([0.025, 0.975], 400, 0.4) / 400
    assert intervals["mean"] == pytest.approx(exact, abs=0.004)
    assert binom.ppf([0.05, 0.95], 400, 0.4) / 400 == pytest.approx(exact + [0.0075, -0.0075], abs=0.0026)


def test_youden_threshold_maximises_j_on_the_given_labels():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.8, 0.9])
    probs = np.stack([1 - p, p], axis=1)
    # >= 0.6 catches every positive at one false positive in four (J = 3/4); no other cut does
    assert TASKS[1].choose_threshold("youden", labels, probs) == pytest.approx(0.6)
    assert TASKS[1].choose_threshold("0.5", labels, probs) == 0.5
    assert TASKS[1].choose_threshold("0.3", labels, probs) == 0.3
    assert TASKS[1].choose_threshold("youden", np.ones(7, dtype=int), probs) == 0.5


# ---------------------------------------------------------------------------------------------
# The threshold comes from validation only: a real run, twice, the second with test labels flipped


def run_smoke(make_cfg, out, flip_test_labels: bool, monkeypatch) -> dict:
    if flip_test_labels:
        def load_flipped(data_cfg):
            dataset = load_dataset(data_cfg)
            dataset.test.labels = 1 - dataset.test.labels
            return dataset
        monkeypatch.setattr(cxr.train, "load_dataset", load_flipped)
    overrides = ["debug=smoke", "data.limit=32", "trainer.epochs=1", "trainer.threshold=youden",
                 "trainer.bootstrap=0", "trainer.tensorboard_images=false"]
    return cxr.train.run(make_cfg(*overrides), out, overrides=overrides)


def test_threshold_comes_from_validation_and_is_applied_to_test_unchanged(
        make_cfg, tmp_path, monkeypatch):
    honest = run_smoke(make_cfg, tmp_path / "honest", False, monkeypatch)
    flipped = run_smoke(make_cfg, tmp_path / "flipped", True, monkeypatch)

    # Youden's J on the test labels would move the threshold; on validation it stays put ...
    threshold = honest["threshold"]
    assert threshold != 0.5
    assert flipped["threshold"] == threshold
    # ... while the flipped labels did reach the test metrics: every right answer became wrong
    assert flipped["metrics"]["test/acc"] == pytest.approx(1 - honest["metrics"]["test/acc"])
    assert flipped["confusion"] == honest["confusion"][::-1]
    for name, result in (("honest", honest), ("flipped", flipped)):
        best = torch.load(tmp_path / name / "best.pt", weights_only=True)
        written = json.loads((tmp_path / name / "result.json").read_text())
        assert best["threshold"] == written["threshold"] == result["threshold"]

    # best.pt's threshold, applied to best.pt's test probabilities, gives the reported metrics
    cfg = make_cfg("debug=smoke", "data.limit=32")
    dataset = load_dataset(cfg.data)
    model, task, _ = load_classifier(tmp_path / "honest" / "best.pt", torch.device("cpu"))
    assert task == dataset.task
    batches = ((preprocess(x, False), y) for x, y in eval_batches(dataset.test, 64))
    _, probs, labels = evaluate(model, batches, task, device=torch.device("cpu"))
    recomputed = classification_metrics(labels, probs, threshold, task)
    for name in ("acc", "sensitivity", "specificity", "auroc"):
        assert recomputed[name] == pytest.approx(honest["metrics"][f"test/{name}"]), name
    assert recomputed["confusion"] == honest["confusion"]

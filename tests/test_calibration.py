"""Calibration (cxr.calibration): ECE against bins worked by hand, Brier and NLL against
scikit-learn, temperature scaling against a one-dimensional minimiser, and real runs: calibrated
with trainer.calibration=temperature against the same run without, and cxr.predict."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from cxr.calibration import binary_calibration, calibration_error, fit_temperature, multiclass_calibration
from cxr.checkpoint import load_classifier
from cxr.config import ConfigError, validate
from cxr.predict import classify
from cxr.task import Task
from cxr.train import run

BINARY = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)
THREE = Task.of(["BACTERIA", "NORMAL", "VIRUS"], multilabel=False)
FINDINGS = Task.of(["Effusion", "Nodule", "Edema"], multilabel=True)

# eight known entries and one unknown (-1), which every number leaves out
SCORES = np.array([0.1, 0.15, 0.3, 0.35, 0.5, 0.7, 0.9, 0.95, 1.0])
OUTCOMES = np.array([0, 1, 0, 1, -1, 1, 1, 0, 1])


def test_ece_equals_the_bins_worked_by_hand():
    # 5 equal-width bins of the 8 known entries, |observed - mean score| x share:
    #   [0, .2):  .1 .15      observed 1/2, mean .125 -> .375 x 2/8 = .09375
    #   [.2, .4): .3 .35      observed 1/2, mean .325 -> .175 x 2/8 = .04375
    #   [.4, .6): (only the unknown .5)                -> empty
    #   [.6, .8): .7          observed 1,   mean .7   -> .3   x 1/8 = .0375
    #   [.8, 1]:  .9 .95 1.0  observed 2/3, mean .95  -> .2833 x 3/8 = .10625
    assert calibration_error(SCORES, OUTCOMES, bins=5) == pytest.approx(0.28125)
    # 2 equal-mass bins split at the known scores' median (.525): four entries each
    #   .1 .15 .3 .35: observed 2/4, mean .225 -> .275 x 4/8; .7 .9 .95 1.0: observed 3/4, mean .8875 -> .1375 x 4/8
    assert calibration_error(SCORES, OUTCOMES, bins=2, equal_mass=True) == pytest.approx(0.20625)
    # the default 15 bins of width 1/15 leave every entry alone but .95 and 1.0 (observed 1/2, mean .975):
    #   (|0-.1| + |1-.15| + |0-.3| + |1-.35| + |1-.7| + |1-.9|) / 8 + .475 x 2/8
    assert calibration_error(SCORES, OUTCOMES) == pytest.approx(2.3 / 8 + 0.475 * 2 / 8)
    assert math.isnan(calibration_error(SCORES[:1], np.array([-1])))  # nothing known: undefined


def test_brier_and_nll_equal_scikit_learns_over_the_known_entries():
    known = OUTCOMES >= 0
    ours = binary_calibration(OUTCOMES, SCORES)
    assert ours["brier"] == pytest.approx(brier_score_loss(OUTCOMES[known], SCORES[known]))
    # scikit-learn clips probabilities to [eps, 1 - eps] of float64; we to 1e-12: the same here but for 1.0
    scores = np.clip(SCORES, 0, 0.999)
    assert binary_calibration(OUTCOMES, scores)["nll"] == pytest.approx(log_loss(OUTCOMES[known], scores[known]))

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    logits = np.eye(3)[labels] + rng.normal(0, 1, (50, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ours = multiclass_calibration(labels, probs)
    assert ours["brier"] == pytest.approx(brier_score_loss(labels, probs, labels=[0, 1, 2]))  # summed over classes
    assert ours["nll"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]))
    right = (probs.argmax(1) == labels).astype(int)  # top label: its probability against being right
    assert ours["ece"] == pytest.approx(calibration_error(probs.max(1), right))
    assert ours["ece_classwise"] == pytest.approx(np.mean([calibration_error(probs[:, k], (labels == k).astype(int))
                                                           for k in range(3)]))


def test_each_kind_reports_its_calibration_with_intervals():
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, -1], size=(80, 3), p=[0.5, 0.35, 0.15])
    labels[:, 2] = -1  # Edema unknown everywhere: undefined, and left out of the means
    probs = np.clip(0.3 * (labels == 1) + 0.7 * rng.random((80, 3)), 0, 1)
    values = FINDINGS.metrics(labels, probs, [0.5] * 3)
    for k, name in enumerate(["Effusion", "Nodule"]):
        known = labels[:, k] >= 0
        assert values[f"brier/{name}"] == pytest.approx(brier_score_loss(labels[known, k], probs[known, k]))
        assert values[f"nll/{name}"] == pytest.approx(log_loss(labels[known, k], probs[known, k]))
    assert math.isnan(values["ece/Edema"])
    assert values["ece"] == pytest.approx((values["ece/Effusion"] + values["ece/Nodule"]) / 2)
    intervals = FINDINGS.intervals(labels, probs, [0.5] * 3, resamples=50)
    assert intervals["ece/Nodule"][0] < intervals["ece/Nodule"][1] and intervals["brier"] is not None

    binary = BINARY.metrics(labels[:, 0].clip(0), np.stack([1 - probs[:, 0], probs[:, 0]], axis=1), 0.5)
    assert {"ece", "ece_quantile", "brier", "nll"} <= set(binary) and "ece_classwise" not in binary
    assert "ece_classwise" in THREE.metrics(np.arange(3), np.eye(3), 0.5)


def nll_at(temperature: float, logits: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's log loss of softmax(logits / T): the oracle's objective."""
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max(1, keepdims=True))
    return log_loss(labels, probs / probs.sum(1, keepdims=True), labels=range(logits.shape[1]))


def test_the_temperature_is_the_one_minimising_validation_nll():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 400)
    # over-confident logits: the truth drawn from softmax(z), the model says 2.5 z
    z = rng.normal(0, 1.5, (400, 3))
    labels = np.array([rng.choice(3, p=np.exp(row) / np.exp(row).sum()) for row in z])
    logits = 2.5 * z

    temperature = fit_temperature(logits, labels, THREE)

    best = minimize_scalar(nll_at, bounds=(0.05, 20), args=(logits, labels), method="bounded",
                           options={"xatol": 1e-8}).x
    assert temperature == pytest.approx(best, rel=1e-4) and 2 < temperature < 3
    assert nll_at(temperature, logits, labels) < nll_at(1.0, logits, labels)


def test_multilabel_fits_one_temperature_per_finding_on_its_known_entries():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (300, 3))
    labels = (rng.random((300, 3)) < 1 / (1 + np.exp(-z))).astype(int)
    labels[rng.random((300, 3)) < 0.2] = -1
    logits = z * np.array([0.5, 1.0, 3.0])  # under-, well and over-confident

    temperatures = fit_temperature(logits, labels, FINDINGS)

    for k in range(3):
        known = labels[:, k] >= 0

        def nll(t, k=k, known=known):
            return log_loss(labels[known, k], 1 / (1 + np.exp(-logits[known, k] / t)), labels=[0, 1])

        best = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-8}).x
        assert temperatures[k] == pytest.approx(best, rel=1e-4)
    assert temperatures[0] < 1 < temperatures[2]


def test_a_temperature_stays_one_where_validation_answers_everything_right(caplog):
    # every argmax right: the NLL of logits / T falls towards 0 as T -> 0, without a minimum
    logits, labels = np.array([[2.0, -1.0], [-1.0, 3.0], [0.5, 0.0]]), np.array([0, 1, 0])
    assert fit_temperature(logits, labels, BINARY) == 1.0
    assert "validation answers every image right" in caplog.text
    # multi-label: Effusion (its unknown entry aside) all right stays 1; Nodule has a wrong entry and
    # an under-confident scale, and is fitted; Edema as Effusion
    logits = np.array([[3.0, 0.2, 1.0], [-2.0, -0.3, -1.0], [1.0, 0.1, 2.0], [-5.0, -0.2, -1.0]])
    labels = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 1], [-1, 0, 0]])
    temperatures = fit_temperature(logits, labels, FINDINGS)
    assert temperatures[0] == temperatures[2] == 1.0 and temperatures[1] != pytest.approx(1.0)
    assert "every entry of Effusion, Edema right" in caplog.text


def test_logits_leaning_to_one_side_reach_the_upper_bound_with_a_warning(caplog):
    # ranked right (the positives' margins are the larger) but every image leans to NORMAL, the six
    # positives more than the two negatives: the NLL falls as T grows towards answering 1/2
    # everywhere (its slope in 1/T at 0 is -mean(sign x margin) / 2 = +1.7 / 16 > 0; convex in 1/T)
    margins = np.array([-1.5, -1.3, -1.0, -0.9, -0.8, -0.7, -0.6, -0.5])
    logits, labels = np.stack([np.zeros(8), margins], axis=1), np.array([0, 0, 1, 1, 1, 1, 1, 1])
    assert fit_temperature(logits, labels, BINARY) == 100.0
    assert "the validation NLL keeps falling as T grows" in caplog.text


def test_an_unknown_calibration_is_refused_before_anything_runs(make_cfg):
    with pytest.raises(ConfigError, match="trainer.calibration must be none|temperature, got platt"):
        validate(make_cfg("trainer.calibration=platt"))


# ---------------------------------------------------------------------------------------------
# Real runs: the embedded data's recipe, small, with and without temperature scaling (two runs and
# full forward passes for predict: slow on a 2-core CPU; the multi-label run of test_multilabel.py
# calibrates in the fast suite)


RECIPE = ("data.limit=32", "trainer.epochs=10", "trainer.bootstrap=50", "trainer.progress=false",
          "trainer.tensorboard_images=false")


@pytest.fixture(scope="module")
def runs(make_cfg, tmp_path_factory) -> dict:
    """The same run (seed, data, epochs) without and with trainer.calibration=temperature."""
    done = {}
    for method in ("none", "temperature"):
        out = tmp_path_factory.mktemp(method)
        overrides = [*RECIPE, f"trainer.calibration={method}"]
        done[method] = (out, run(make_cfg(*overrides), out, overrides=overrides))
    return done


def read_predictions(out: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    with open(out / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    truth = np.array([row["truth"] == "PNEUMONIA" for row in rows])
    return rows, truth, np.array([float(row["prob_PNEUMONIA"]) for row in rows])


@pytest.mark.slow
def test_a_run_reports_test_calibration_with_intervals_and_validation_calibration_per_epoch(runs):
    out, record = runs["none"]
    saved = json.loads((out / "result.json").read_text())
    _, truth, scores = read_predictions(out)
    metrics, intervals = saved["metrics"], saved["intervals"]
    assert metrics["test/brier"] == pytest.approx(brier_score_loss(truth, scores), abs=1e-6)
    assert metrics["test/nll"] == pytest.approx(log_loss(truth, scores), abs=1e-6)
    for name in ("test/ece", "test/ece_quantile", "test/brier", "test/nll"):
        low, high = intervals[name]
        assert 0 <= low < high, name
    assert all({"val/ece", "val/brier", "val/nll"} <= set(row) for row in saved["history"])
    assert saved["calibration"] == {"method": "none", "temperature": None, "before": {}, "after": {}}
    assert torch.load(out / "best.pt", weights_only=True)["temperature"] is None


@pytest.mark.slow
def test_temperature_scaling_keeps_auroc_and_decisions_and_lowers_validation_nll(runs):
    (plain, unscaled), (scaled, calibrated) = runs["none"], runs["temperature"]
    temperature = calibrated["calibration"]["temperature"]
    assert temperature != pytest.approx(1, abs=0.05)  # it did rescale
    assert torch.load(scaled / "best.pt", weights_only=True)["temperature"] == temperature
    # the ranking is the same: AUROC to 1e-9, from result.json and from the predictions on disk
    assert calibrated["metrics"]["test/auroc"] == pytest.approx(unscaled["metrics"]["test/auroc"], abs=1e-9)
    plain_rows, truth, plain_scores = read_predictions(plain)
    scaled_rows, _, scaled_scores = read_predictions(scaled)
    assert roc_auc_score(truth, scaled_scores) == pytest.approx(roc_auc_score(truth, plain_scores), abs=1e-9)
    assert not np.allclose(scaled_scores, plain_scores)
    # the threshold was chosen again on the calibrated validation probabilities: same decisions
    assert [row["label"] for row in scaled_rows] == [row["label"] for row in plain_rows]
    assert calibrated["confusion"] == unscaled["confusion"]
    # validation NLL of the best epoch: not worse than the run without calibration
    after = calibrated["calibration"]["after"]
    assert after["val/nll"] <= unscaled["metrics"]["val/nll"] + 1e-9
    assert calibrated["calibration"]["before"]["val/nll"] == pytest.approx(unscaled["metrics"]["val/nll"], abs=1e-6)
    assert after["test/nll"] == pytest.approx(calibrated["metrics"]["test/nll"])


@pytest.mark.slow
def test_predict_applies_the_runs_temperature(runs):
    out, record = runs["temperature"]
    rows, _, scores = read_predictions(out)
    model, task, settings = load_classifier(out / "best.pt", torch.device("cpu"))
    assert settings["temperature"] == record["calibration"]["temperature"]

    rows, scores = rows[:16], scores[:16]  # a full forward pass per image: a few suffice
    files = [Path(row["path"]) for row in rows]
    predicted = classify(model, task, settings, files, torch.device("cpu"), batch_size=16)
    unscaled = classify(model, task, {**settings, "temperature": None}, files, torch.device("cpu"), batch_size=16)

    # the run read its frozen backbone's features from the float16 cache, predict computes them: 1e-3
    np.testing.assert_allclose([float(row["prob_PNEUMONIA"]) for row in predicted], scores, atol=1e-3)
    # ... while the same model without the temperature is far from the run's probabilities
    assert np.abs(np.array([float(row["prob_PNEUMONIA"]) for row in unscaled]) - scores).max() > 0.02


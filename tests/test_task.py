"""Each task kind's loss, probabilities and decisions against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from cxr.task import Task

LN = math.log


def test_binary_softmax_cross_entropy_and_a_threshold_on_the_positive_class():
    task = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)
    assert (task.kind, task.outputs, task.positive) == ("binary", 2, 1)
    logits = torch.tensor([[0.0, LN(3)], [LN(7), LN(3)]])  # softmax: (1/4, 3/4), (7/10, 3/10)
    probs = task.probabilities(logits).numpy()
    np.testing.assert_allclose(probs, [[0.25, 0.75], [0.7, 0.3]], rtol=1e-6)
    labels = torch.tensor([1, 1])
    assert task.loss(logits, labels).item() == pytest.approx((-LN(0.75) - LN(0.3)) / 2, rel=1e-6)
    assert task.mean_loss(probs, labels.numpy()) == pytest.approx((-LN(0.75) - LN(0.3)) / 2, rel=1e-6)
    # P(PNEUMONIA) 0.75 and 0.3 against 0.6 and 0.25
    assert task.decide(probs, 0.6).tolist() == [1, 0]
    assert task.decide(probs, 0.25).tolist() == [1, 1]
    right, counted = task.correct(logits, torch.tensor([1, 0]))
    assert (int(right), counted) == (2, 2)


def test_pneumonia_is_positive_wherever_it_sits_and_decisions_follow_it():
    task = Task.of(["PNEUMONIA", "NORMAL"], multilabel=False)
    assert task.positive == 0
    probs = np.array([[0.75, 0.25], [0.3, 0.7]])
    assert task.decide(probs, 0.6).tolist() == [0, 1]


def test_multiclass_argmax_whatever_the_threshold():
    task = Task.of(["BACTERIA", "NORMAL", "VIRUS"], multilabel=False)
    assert (task.kind, task.outputs, task.positive) == ("multiclass", 3, 2)  # no PNEUMONIA: the last class
    logits = torch.tensor([[0.0, LN(2), LN(5)], [LN(6), LN(1), LN(1)]])  # (1, 2, 5)/8, (6, 1, 1)/8
    probs = task.probabilities(logits).numpy()
    np.testing.assert_allclose(probs, [[1 / 8, 2 / 8, 5 / 8], [6 / 8, 1 / 8, 1 / 8]], rtol=1e-6)
    labels = torch.tensor([2, 1])
    assert task.loss(logits, labels).item() == pytest.approx((-LN(5 / 8) - LN(1 / 8)) / 2, rel=1e-6)
    assert task.decide(probs, 0.99).tolist() == [2, 0]
    assert task.choose_threshold("youden", labels.numpy(), probs) == 0.5  # unused by argmax


def test_multilabel_sigmoids_masked_bce_and_a_threshold_per_finding():
    task = Task.of(["Effusion", "Nodule", "Pneumonia"], multilabel=True)
    assert (task.kind, task.outputs, task.positive) == ("multilabel", 3, 0)
    logits = torch.tensor([[0.0, LN(3), -LN(3)]])  # sigmoid: 1/2, 3/4, 1/4
    probs = task.probabilities(logits).numpy()
    np.testing.assert_allclose(probs, [[0.5, 0.75, 0.25]], rtol=1e-6)
    labels = torch.tensor([[1, -1, 0]])  # Nodule unknown: neither rewarded nor punished
    expected = (-LN(0.5) - LN(1 - 0.25)) / 2
    assert task.loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert task.mean_loss(probs, labels.numpy()) == pytest.approx(expected, rel=1e-6)
    assert task.decide(probs, [0.5, 0.8, 0.2]).tolist() == [[1, 0, 1]]
    right, counted = task.correct(logits, labels)  # at 0.5: Effusion called (right), Pneumonia not (right)
    assert (int(right), int(counted)) == (2, 2)
    assert task.label_name(np.array([1, 0, 1])) == "Effusion|Pneumonia"
    assert task.label_name(np.array([0, 0, 0])) == "No Finding"


def test_a_task_is_stored_and_rebuilt_and_a_wrong_kind_is_refused():
    task = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)
    assert Task.from_state(task.state()) == task
    assert Task.of_labels(["a", "b"], np.zeros((4, 2))).multilabel
    assert not Task.of_labels(["a", "b"], np.zeros(4)).multilabel
    with pytest.raises(ValueError, match="task kind"):
        Task("regression", ("a",))

"""cxr.transfer: which of a model's outputs scores which target label, and the target task's
probabilities, labels and thresholds it gives, checked on hand-made arrays (scikit-learn as the
metric oracle); the label presets as conf/labels/ composes them."""

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score

from cxr import results
from cxr.config import CONF_DIR
from cxr.task import Task
from cxr.transfer import LabelError, scoring

KAGGLE = Task("binary", ("NORMAL", "PNEUMONIA"))
NIH = Task("multilabel", ("Cardiomegaly", "Effusion", "Pneumonia"))


def preset(name: str) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"labels={name}"])
    return {key: list(value) if not isinstance(value, str) else value for key, value in cfg.eval.labels.items()}


def test_a_binary_model_scores_a_multilabel_finding_with_its_positive_probability():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([[0, 1, 0], [1, 0, 1], [-1, 0, 1], [0, 0, -1]])  # Pneumonia: 0, 1, 1, unknown
    scored = scoring(KAGGLE, NIH, {"PNEUMONIA": "Pneumonia"})
    assert scored.task == Task("multilabel", ("Pneumonia",)) and scored.pairs == {"Pneumonia": "PNEUMONIA"}
    assert scored.probabilities(probs).tolist() == [[0.1], [0.7], [0.4], [0.8]] == probs[:, [1]].tolist()
    assert scored.labels(labels).tolist() == [[0], [1], [1], [-1]]
    assert scored.threshold(0.45) == [0.45] and scored.absent == ()
    tested = results.tested(scored.task, scored.labels(labels), scored.probabilities(probs), [0.45], 0.0, 0)
    assert tested["metrics"]["test/auroc"] == roc_auc_score([0, 1, 1], [0.1, 0.7, 0.4])  # the unknown left out
    assert tested["metrics"]["test/sensitivity"] == 0.5  # 0.7 called, 0.4 not, at the model's 0.45


def test_a_multilabel_model_scores_a_binary_target_with_one_minus_p_and_p():
    """Backwards through the same entry; the two columns in the target's class order, whichever it is."""
    probs = np.array([[0.2, 0.6, 0.9], [0.5, 0.1, 0.3]], dtype=np.float32)
    for target in (KAGGLE, Task("binary", ("PNEUMONIA", "NORMAL"))):
        scored = scoring(NIH, target, {"PNEUMONIA": "Pneumonia"})
        assert scored.pairs == {"PNEUMONIA": "Pneumonia"} and scored.task == target
        two = scored.probabilities(probs)
        assert two[:, target.positive].tolist() == probs[:, 2].tolist()
        assert np.allclose(two[:, 1 - target.positive], 1 - probs[:, 2])
        assert scored.threshold([0.3, 0.4, 0.55]) == 0.55  # the model's own for its Pneumonia output
        assert scored.labels(np.array([0, 1])).tolist() == [0, 1]


def test_names_alike_pair_themselves_and_a_binary_models_other_class_flips_its_threshold():
    assert scoring(KAGGLE, KAGGLE).pairs == {"PNEUMONIA": "PNEUMONIA"}
    flipped = scoring(KAGGLE, Task("multilabel", ("Normal", "Effusion")), {"NORMAL": "Normal"})
    assert flipped.outputs == (0,) and flipped.threshold(0.3) == [0.7]  # P(NORMAL) >= 0.7 iff P(PNEUMONIA) <= 0.3
    nih_on_chexpert = scoring(NIH, Task("multilabel", ("Pleural Effusion", "Pneumonia", "Cardiomegaly")))
    assert nih_on_chexpert.pairs == {"Pneumonia": "Pneumonia", "Cardiomegaly": "Cardiomegaly"}
    assert nih_on_chexpert.columns == (1, 2) and nih_on_chexpert.outputs == (2, 0)


def test_presets_pair_both_ways_and_a_label_the_target_lacks_is_na():
    assert preset("pneumonia") == {"PNEUMONIA": "Pneumonia"}
    opacity = preset("pneumonia_opacity")
    assert opacity == {"PNEUMONIA": ["Pneumonia", "Lung Opacity", "Consolidation"]}
    chexpert = Task("multilabel", ("Consolidation", "Edema", "Lung Opacity", "Pneumonia"))
    assert scoring(KAGGLE, chexpert, opacity).pairs == {name: "PNEUMONIA" for name in
                                                         ("Consolidation", "Lung Opacity", "Pneumonia")}
    on_nih = scoring(KAGGLE, NIH, opacity)
    assert on_nih.pairs == {"Pneumonia": "PNEUMONIA"} and on_nih.absent == ("Lung Opacity", "Consolidation")
    # backwards only the first name pairs: a CheXpert model's Pneumonia, not its opacity outputs
    assert scoring(chexpert, KAGGLE, opacity).pairs == {"PNEUMONIA": "Pneumonia"}
    # a binary target reports no n/a: its one scored class is its positive one
    assert scoring(KAGGLE, KAGGLE, opacity).absent == ()


def test_a_multiclass_model_scores_a_target_class_for_class():
    source = Task("multiclass", ("bacteria", "normal", "virus"))
    target = Task("multiclass", ("NORMAL", "BACTERIAL", "VIRAL"))
    scored = scoring(source, target, {"normal": "NORMAL", "bacteria": "BACTERIAL", "virus": "VIRAL"})
    probs = np.array([[0.5, 0.2, 0.3]])
    assert scored.probabilities(probs).tolist() == [[0.2, 0.5, 0.3]] and scored.threshold(0.5) == 0.5
    with pytest.raises(LabelError, match="class for class"):
        scoring(source, target, {"normal": "NORMAL"})
    with pytest.raises(LabelError, match="class for class"):
        scoring(source, KAGGLE, {"normal": "NORMAL", "bacteria": "PNEUMONIA"})


def test_labels_that_do_not_pair_are_one_line_naming_both_sides():
    with pytest.raises(LabelError) as nothing:
        scoring(KAGGLE, NIH)
    message = str(nothing.value)
    assert "\n" not in message and all(name in message for name in (*KAGGLE.classes, *NIH.classes))
    with pytest.raises(LabelError, match="positive class PNEUMONIA") as binary:
        scoring(NIH, KAGGLE)
    assert "Cardiomegaly" in str(binary.value) and "NORMAL" in str(binary.value)
    with pytest.raises(LabelError, match="PNEUMONA: Pneumonias names neither a model output") as typo:
        scoring(KAGGLE, NIH, {"PNEUMONA": "Pneumonias"})
    assert "NORMAL, PNEUMONIA" in str(typo.value) and "Cardiomegaly, Effusion, Pneumonia" in str(typo.value)
    with pytest.raises(LabelError, match="several model outputs"):
        scoring(NIH, Task("multilabel", ("Effusion", "Fluid")), {"Cardiomegaly": "Effusion"})

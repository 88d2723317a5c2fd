"""Multi-label datasets: NIH ChestX-ray14 and CheXpert layouts built from generated images,
checked against hand counts of the tables written here and against scikit-learn."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cxr import results
from cxr.data import DataError, load_dataset
from cxr.predict import main as predict_main
from cxr.task import Task
from cxr.train import run, run_safely

REPO = Path(__file__).resolve().parents[1]
FINDINGS = ("Effusion", "Nodule", "Pneumonia")
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
# a sign per finding: a bright block in its own part of the image
REGIONS = {"Effusion": (slice(44, 60), slice(4, 28)), "Nodule": (slice(8, 20), slice(40, 52)),
           "Pneumonia": (slice(24, 40), slice(20, 44)), "Cardiomegaly": (slice(40, 56), slice(36, 60)),
           "Edema": (slice(4, 16), slice(4, 16))}


def draw(rng: np.random.Generator, findings) -> Image.Image:
    pixels = rng.normal(90, 25, (64, 64))
    for name in findings:
        pixels[REGIONS[name]] += 90
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def runner_overrides(root, *extra):
    return [f"data.root={root}", "model.weights=null", "model.backbone=resnet18", "model.freeze_backbone=true",
            "data.image_size=64", "trainer.epochs=8", "trainer.batch_size=16", "trainer.bootstrap=50",
            "trainer.progress=false", "trainer.device=cpu", "optimizer.lr=1e-3", *extra]


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory):
    """NIH layout: Data_Entry_2017.csv, test_list.txt, train_val_list.txt, images_001/images/*.png;
    60 patients of 2 images, findings drawn independently (so they co-occur), a third in test."""
    root = tmp_path_factory.mktemp("nih")
    (root / "images_001" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, test = [], []
    for patient in range(1, 61):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = [f for f in FINDINGS if rng.random() < 0.4]
            draw(rng, findings).save(root / "images_001" / "images" / name)
            rows.append([name, "|".join(findings) or "No Finding", follow_up, patient, 50, "M", "PA", 64, 64,
                         0.14, 0.14])
            (test if patient % 3 == 0 else []).append(name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        csv.writer(f).writerows([NIH_HEADER, *rows])
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[0] not in test) + "\n")
    return root


CHEXPERT_FINDINGS = ("Cardiomegaly", "Edema", "Pneumonia")


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
    """CheXpert-v1.0-small/{train,valid}.csv and train/, valid/ images; cells 1.0, 0.0, -1.0 and
    blank; one lateral view per fifth study; no Edema positive in valid.csv."""
    base = tmp_path_factory.mktemp("chexpert")
    root = base / "CheXpert-v1.0-small"
    rng = np.random.default_rng(1)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *CHEXPERT_FINDINGS]
    for split, patients in (("train", range(1, 61)), ("valid", range(61, 81))):
        rows = []
        for patient in patients:
            for view, frontal in (("view1_frontal", True), ("view2_lateral", patient % 5 == 0)):
                if view == "view2_lateral" and not frontal:
                    continue
                path = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study1/{view}.jpg"
                cells = [rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.35, 0.35, 0.15, 0.15]) for _ in CHEXPERT_FINDINGS]
                if split == "valid":
                    cells[1] = "0.0"  # Edema: absent from the test split
                present = [name for name, cell in zip(CHEXPERT_FINDINGS, cells, strict=True) if cell == "1.0"]
                (base / path).parent.mkdir(parents=True, exist_ok=True)
                draw(rng, present).save(base / path, quality=95)
                rows.append([path, "Male", 60, "Frontal" if "frontal" in view else "Lateral", "PA",
                             "" if present else "1.0", *cells])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return root


@pytest.mark.parametrize("layout, expected", [("folders", "file name pattern"), ("nih", "column Patient ID"),
                                              ("chexpert", "CheXpert path")])
def test_item5_the_patient_source_is_recorded(make_cfg, nih_root, chexpert_root, layout, expected):
    overrides = {"folders": [], "nih": ["data=nih", f"data.root={nih_root}"],
                 "chexpert": ["data=chexpert", f"data.root={chexpert_root}"]}[layout]
    dataset = load_dataset(make_cfg(*overrides, "data.image_size=32").data)
    assert results.data_summary(dataset)["patients"] == expected


def test_item5_a_chexpert_path_without_its_patient_folder_is_one_line(make_cfg, tmp_path):
    """A failed match fell back to the file stem: every view1_frontal.jpg one patient."""
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *CHEXPERT_FINDINGS]
    folders_of = {"train": ["patient00001", "patient00002", "p3", "patient00004"], "valid": ["patient00009"]}
    for split, folders in folders_of.items():
        rows = []
        for folder in folders:
            path = f"CheXpert-v1.0-small/{split}/{folder}/study1/view1_frontal.jpg"
            (tmp_path / path).parent.mkdir(parents=True)
            Image.new("L", (40, 40)).save(tmp_path / path)
            rows.append([path, "Male", 60, "Frontal", "PA", "", "1.0", "0.0", ""])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    with pytest.raises(DataError) as error:
        load_dataset(make_cfg("data=chexpert", f"data.root={root}", "data.image_size=32").data)
    message = str(error.value)
    assert "line 4: no patient folder (patientNNNNN) in path 'CheXpert-v1.0-small/train/p3/study1/" in message
    assert "\n" not in message


def chexpert_cells(root, split: str, frontal_only: bool) -> list[list[str]]:
    with open(root / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[row[name] for name in CHEXPERT_FINDINGS] for row in rows
            if not frontal_only or row["Frontal/Lateral"] == "Frontal"]


def counts(dataset, splits=("train", "val")) -> np.ndarray:
    """(positive, negative, unknown) per finding over the given splits."""
    labels = torch.cat([getattr(dataset, name).labels for name in splits]).numpy()
    return np.stack([(labels == 1).sum(0), (labels == 0).sum(0), (labels == -1).sum(0)], 1)


@pytest.mark.parametrize("uncertain, blank", [("ones", "negative"), ("zeros", "negative"), ("ignore", "ignore")])
def test_chexpert_uncertainty_and_blank_policies_give_the_documented_label_counts(make_cfg, chexpert_root,
                                                                                  uncertain, blank):
    cfg = make_cfg("data=chexpert", f"data.root={chexpert_root}", "data.image_size=32",
                   f"data.uncertain={uncertain}", f"data.blank={blank}")
    dataset = load_dataset(cfg.data)
    value = {"1.0": 1, "0.0": 0, "-1.0": {"ones": 1, "zeros": 0, "ignore": -1}[uncertain],
             "": {"negative": 0, "ignore": -1}[blank]}
    for splits, table in ((("train", "val"), "train"), (("test",), "valid")):
        cells = np.array([[value[c] for c in row] for row in chexpert_cells(chexpert_root, table, True)])
        expected = np.stack([(cells == 1).sum(0), (cells == 0).sum(0), (cells == -1).sum(0)], 1)
        np.testing.assert_array_equal(counts(dataset, splits), expected)
    assert dataset.task.multilabel and dataset.classes == list(CHEXPERT_FINDINGS)


def test_chexpert_views_all_keeps_the_lateral_images(make_cfg, chexpert_root):
    frontal = load_dataset(make_cfg("data=chexpert", f"data.root={chexpert_root}", "data.image_size=32").data)
    every = load_dataset(make_cfg("data=chexpert", f"data.root={chexpert_root}", "data.image_size=32",
                                  "data.views=all").data)
    lateral = sum(1 for split in ("train", "valid") for row in chexpert_cells(chexpert_root, split, False)) - sum(
        1 for split in ("train", "valid") for row in chexpert_cells(chexpert_root, split, True))
    assert lateral > 0
    assert sum(map(len, (every.train, every.val, every.test))) - sum(map(len, (frontal.train, frontal.val,
                                                                               frontal.test))) == lateral
    assert not any("lateral" in path for path in frontal.train.paths + frontal.test.paths)


def test_nih_layout_uses_the_official_test_list_and_splits_train_by_patient(make_cfg, nih_root):
    dataset = load_dataset(make_cfg("data=nih", f"data.root={nih_root}", "data.image_size=32").data)
    test_names = set((nih_root / "test_list.txt").read_text().split())
    assert {p.rsplit("/", 1)[1] for p in dataset.test.paths} == test_names
    patients = [{p.rsplit("/", 1)[1][:8] for p in split.paths} for split in (dataset.train, dataset.val)]
    assert patients[0] and patients[1] and not patients[0] & patients[1]
    with open(nih_root / "Data_Entry_2017.csv", newline="") as f:
        truth = {row["Image Index"]: set(row["Finding Labels"].split("|")) for row in csv.DictReader(f)}
    for path, label in zip(dataset.train.paths, dataset.train.labels.tolist(), strict=True):
        called = {name for name, v in zip(dataset.classes, label, strict=True) if v == 1}
        assert called == truth[path.rsplit("/", 1)[1]] - {"No Finding"}


def test_data_labels_picks_findings_and_a_misspelt_one_is_one_line(make_cfg, nih_root, tmp_path):
    dataset = load_dataset(make_cfg("data=nih", f"data.root={nih_root}", "data.image_size=32",
                                    "data.labels=[Pneumonia,Effusion]").data)
    assert dataset.classes == ["Pneumonia", "Effusion"] and dataset.train.labels.shape[1] == 2
    record = run_safely(make_cfg("data=nih", "data.labels=[Pneumonia,Efusion]", *runner_overrides(nih_root)),
                        tmp_path, [])
    assert record["status"] == "failed"
    assert record["error"].startswith("data.labels names 'Efusion', not a finding of") and "\n" not in record["error"]


def test_masked_bce_matches_torch_on_the_known_entries_and_pos_weight_counts_them():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([[1, 0, -1], [0, -1, 1], [-1, 1, 0]])
    known = labels >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known].float())
    task = Task.of(FINDINGS, multilabel=True)
    assert torch.isclose(task.loss(logits, labels), expected)
    # known per finding: (1 positive, 2 negatives), (1, 1), (1, 1)
    labels2 = torch.tensor([[1, 0, -1], [0, -1, 1], [0, 1, 0]])
    weight = task.pos_weight(labels2, "balanced")
    np.testing.assert_allclose(weight.numpy(), [2.0, 1.0, 1.0])
    known2 = labels2 >= 0
    weighted = F.binary_cross_entropy_with_logits(logits[known2], labels2[known2].float(),
                                                  pos_weight=weight.expand_as(logits)[known2])
    assert torch.isclose(task.loss(logits, labels2, weight), weighted)


def test_per_finding_auroc_and_mean_match_scikit_learn_and_unknowns_are_left_out():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (200, 3))
    probs = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    task = Task.of(FINDINGS, multilabel=True)
    metrics = task.metrics(labels, probs, [0.5, 0.5, 0.5])
    per_finding = roc_auc_score(labels, probs, average=None)
    for name, value in zip(FINDINGS, per_finding, strict=True):
        assert metrics[f"auroc/{name}"] == pytest.approx(value)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probs, average="macro"))
    masked = labels.copy()
    masked[:50, 1] = -1
    assert task.metrics(masked, probs, [0.5] * 3)["auroc/Nodule"] == pytest.approx(
        roc_auc_score(labels[50:, 1], probs[50:, 1]))
    absent = labels.copy()
    absent[:, 2] = 0
    result = task.metrics(absent, probs, [0.5] * 3)
    assert math.isnan(result["auroc/Pneumonia"])
    assert result["auroc"] == pytest.approx(roc_auc_score(labels[:, :2], probs[:, :2], average="macro"))


def youden_j(present: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    called = scores >= threshold
    return called[present].mean() - called[~present].mean()


def test_masked_per_finding_youden_thresholds_maximise_j_on_the_known_entries():
    """Each finding's threshold reaches the largest TPR - FPR (Youden's J) that any cut reaches on
    its known entries, measured here at every cut (scikit-learn's roc_curve gives the cuts). The
    60 unknown Nodule entries score 0.95+: counted as negatives they would move that threshold."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (200, 3))
    probs = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    labels[:60, 1], probs[:60, 1] = -1, 0.95 + 0.05 * rng.random(60)
    thresholds = Task.of(FINDINGS, multilabel=True).choose_threshold("youden", labels, probs)
    for k, threshold in enumerate(thresholds):
        known = labels[:, k] >= 0
        present, scores = labels[known, k] == 1, probs[known, k]
        _, _, cuts = roc_curve(present, scores)
        best = max(youden_j(present, scores, cut) for cut in cuts)
        assert youden_j(present, scores, threshold) == pytest.approx(best), FINDINGS[k]
    as_negatives = labels[:, 1] == 1
    _, _, cuts = roc_curve(as_negatives, probs[:, 1])
    wrong = max(cuts, key=lambda cut: youden_j(as_negatives, probs[:, 1], cut))
    known = labels[:, 1] >= 0
    assert youden_j(labels[known, 1] == 1, probs[known, 1], wrong) < youden_j(
        labels[known, 1] == 1, probs[known, 1], thresholds[1]) - 0.05


@pytest.fixture(scope="module")
def nih_run(make_cfg, nih_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("nih-run")
    record = run(make_cfg("data=nih", *runner_overrides(nih_root, "trainer.calibration=temperature")), out)
    return out, record


def truth_matrix(rows, findings):
    return np.array([[int(row[f"truth_{name}"]) for name in findings] for row in rows])


def test_a_nih_run_reports_each_finding_and_the_mean_as_scikit_learn_computes_them(nih_run):
    out, record = nih_run
    saved = json.loads((out / "result.json").read_text())
    assert saved["status"] == "ok" and saved["data"]["multilabel"] and saved["data"]["classes"] == list(FINDINGS)
    with open(out / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    truth = truth_matrix(rows, FINDINGS)
    probs = np.array([[float(row[f"prob_{name}"]) for name in FINDINGS] for row in rows])
    for name, value in zip(FINDINGS, roc_auc_score(truth, probs, average=None), strict=True):
        assert saved["metrics"][f"test/auroc/{name}"] == pytest.approx(value, abs=1e-5)
    assert saved["metrics"]["test/auroc"] == pytest.approx(roc_auc_score(truth, probs, average="macro"), abs=1e-5)
    assert len(saved["threshold"]) == 3 and saved["intervals"]["test/auroc/Nodule"] is not None
    # the signs are easy: the frozen random features learn them
    assert saved["metrics"]["test/auroc"] > 0.8, saved["metrics"]
    called = np.array([[int(name in row["label"].split("|")) for name in FINDINGS] for row in rows])
    np.testing.assert_array_equal(called, (probs >= np.array(saved["threshold"]) - 5e-7).astype(int))


def test_a_nih_run_calibrates_each_finding_and_reports_its_calibration(nih_run):
    out, record = nih_run
    saved = json.loads((out / "result.json").read_text())
    with open(out / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    truth, probs = truth_matrix(rows, FINDINGS), np.array([[float(row[f"prob_{name}"]) for name in FINDINGS]
                                                           for row in rows])
    calibration = saved["calibration"]
    assert len(calibration["temperature"]) == len(FINDINGS)  # one per finding
    assert torch.load(out / "best.pt", weights_only=True)["temperature"] == calibration["temperature"]
    for k, name in enumerate(FINDINGS):
        assert saved["metrics"][f"test/brier/{name}"] == pytest.approx(brier_score_loss(truth[:, k], probs[:, k]),
                                                                       abs=1e-6)
        assert saved["metrics"][f"test/nll/{name}"] == pytest.approx(log_loss(truth[:, k], probs[:, k]), abs=1e-6)
        assert saved["intervals"][f"test/ece/{name}"] is not None
        # monotone per finding: each AUROC as before calibration
        assert calibration["after"][f"test/auroc/{name}"] == pytest.approx(calibration["before"][f"test/auroc/{name}"],
                                                                           abs=1e-9)
    assert saved["metrics"]["test/ece"] == pytest.approx(np.mean([saved["metrics"][f"test/ece/{name}"]
                                                                  for name in FINDINGS]))
    assert calibration["after"]["val/nll"] <= calibration["before"]["val/nll"] + 1e-9


def test_a_nih_run_logs_per_finding_auroc_to_tensorboard(nih_run):
    out, record = nih_run
    events = EventAccumulator(str(out)).Reload()
    tags = events.Tags()["scalars"]
    for name in FINDINGS:
        assert f"val/auroc/{name}" in tags and f"test/auroc/{name}" in tags
    # a curve, a reliability panel and a row per finding
    assert {"test/roc", "test/reliability", "test/gradcam"} <= set(events.Tags()["images"])
    history = [row[f"val/auroc/{FINDINGS[0]}"] for row in record["history"]]
    logged = [event.value for event in events.Scalars(f"val/auroc/{FINDINGS[0]}")]
    np.testing.assert_allclose(logged, history, rtol=1e-6)


def test_predict_writes_a_column_per_finding_and_grad_cam_of_a_chosen_finding(nih_run, nih_root, tmp_path):
    out, record = nih_run
    images = nih_root / "images_001" / "images"
    output = tmp_path / "predictions.csv"
    assert predict_main([f"checkpoint={out / 'best.pt'}", f"inputs={images}", f"output={output}",
                         f"gradcam={tmp_path / 'cams'}", "gradcam_class=Nodule", "device=cpu"]) == 0
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", *(f"prob_{name}" for name in FINDINGS), "label", "status"]
    assert len(rows) == 120 and len(list((tmp_path / "cams").glob("*.png"))) == 120
    with open(out / "test_predictions.csv", newline="") as f:  # the same model and thresholds as the run
        tested = {row["path"]: row for row in csv.DictReader(f)}
    shared = [row for row in rows if row["path"] in tested]
    assert len(shared) == len(tested) == 40
    for row in shared:
        assert row["label"] == tested[row["path"]]["label"]
    assert predict_main([f"checkpoint={out / 'best.pt'}", f"inputs={images}", f"output={output}",
                         f"gradcam={tmp_path / 'cams'}", "gradcam_class=Fracture", "device=cpu"]) == 1


def test_a_chexpert_run_with_a_finding_absent_from_test_reports_null_for_it(make_cfg, chexpert_root, tmp_path):
    record = run(make_cfg("data=chexpert", *runner_overrides(chexpert_root, "data.uncertain=ignore",
                                                             "trainer.epochs=2")), tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert record["status"] == "ok"
    assert saved["metrics"]["test/auroc/Edema"] is None
    defined = [saved["metrics"][f"test/auroc/{name}"] for name in ("Cardiomegaly", "Pneumonia")]
    assert saved["metrics"]["test/auroc"] == pytest.approx(np.mean(defined))


def test_item3_unknown_labels_stay_unknown_in_the_predictions_and_recompute_result_json(
        make_cfg, chexpert_root, tmp_path):
    """Issue 20 item 3: uncertain and blank CheXpert cells (masked out of every metric) were written
    as negatives in test_predictions.csv, so metrics recomputed from it disagreed with result.json.
    Each finding's truth is now 1, 0 or empty (unknown): scikit-learn on the CSV's known entries
    gives result.json's per-finding AUROCs to 1e-9."""
    run(make_cfg("data=chexpert", *runner_overrides(chexpert_root, "data.uncertain=ignore", "data.blank=ignore",
                                                    "trainer.epochs=2", "trainer.tensorboard_images=false")),
        tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    with open(tmp_path / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells = {row[0]: row[1:] for row in chexpert_cells_by_path(chexpert_root, "valid")}
    unknowns = 0
    for name in CHEXPERT_FINDINGS:
        truth = [row[f"truth_{name}"] for row in rows]
        # the file on disk says which labels are unknown: -1.0 and blank cells
        expected = [{"1.0": "1", "0.0": "0", "-1.0": "", "": ""}[cells[row["path"]][CHEXPERT_FINDINGS.index(name)]]
                    for row in rows]
        assert truth == expected, name
        unknowns += truth.count("")
        known = [i for i, value in enumerate(truth) if value != ""]
        y = np.array([int(truth[i]) for i in known])
        scores = np.array([float(rows[i][f"prob_{name}"]) for i in known])
        if len(set(y)) == 2:
            assert saved["metrics"][f"test/auroc/{name}"] == pytest.approx(roc_auc_score(y, scores), abs=1e-9), name
        else:
            assert saved["metrics"][f"test/auroc/{name}"] is None, name
    assert unknowns > 0


def chexpert_cells_by_path(root, split: str) -> list[list[str]]:
    """[image path, cell per finding] of a CheXpert table's frontal rows, paths as cxr lists them."""
    with open(root / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[str(root.parent / row["Path"]), *(row[name] for name in CHEXPERT_FINDINGS)] for row in rows
            if row["Frontal/Lateral"] == "Frontal"]


@pytest.mark.parametrize("form", ["separator", "columns"])
def test_any_csv_with_findings_gives_the_nih_layouts_dataset(make_cfg, nih_root, tmp_path, form):
    """The NIH table rewritten as a generic CSV (findings joined in one column, or a 1/0 column
    per finding), with the split and patient as columns: the same images, labels and splits."""
    nih = load_dataset(make_cfg("data=nih", f"data.root={nih_root}", "data.image_size=32").data)
    with open(nih_root / "Data_Entry_2017.csv", newline="") as f:
        entries = list(csv.DictReader(f))
    test_names = set((nih_root / "test_list.txt").read_text().split())
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        label_header = ["Findings"] if form == "separator" else list(FINDINGS)
        writer.writerow(["File", *label_header, "Patient", "Split"])
        for row in reversed(entries):
            found = set(row["Finding Labels"].split("|"))
            labels = ([";".join(sorted(found - {"No Finding"})) or "none"] if form == "separator"
                      else ["1" if name in found else "0" for name in FINDINGS])
            split = "test" if row["Image Index"] in test_names else "train"
            writer.writerow([f"images_001/images/{row['Image Index']}", *labels, row["Patient ID"], split])
    labelling = (["data.label_column=Findings", "data.label_separator=';'", "data.no_finding=none"]
                 if form == "separator" else [f"data.label_columns=[{','.join(FINDINGS)}]"])
    generic = load_dataset(make_cfg("data=csv", f"data.csv={table}", f"data.root={nih_root}", "data.image_size=32",
                                    "data.path_column=File", "data.patient_column=Patient", "data.split_column=Split",
                                    *labelling).data)
    assert generic.task == nih.task and generic.task.multilabel
    for name in ("train", "val", "test"):
        ours, theirs = getattr(generic, name), getattr(nih, name)
        assert ours.paths == theirs.paths
        assert torch.equal(ours.labels, theirs.labels)


def test_a_multilabel_sweep_of_two_variants_writes_the_per_finding_table(nih_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "cxr.train", "-m", "data=nih", *runner_overrides(nih_root),
                           "trainer.epochs=2", "trainer.tensorboard_images=false", "model.dense=8,16",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (sweep / "results.md").read_text()
    section = report.split("## Test AUROC per finding", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("|"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["Model", *FINDINGS, "Mean"]
    assert len([line for line in section.splitlines() if line.startswith("|")]) == 2 + 2  # header, rule, 2 rows
    with open(sweep / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    jobs = sorted(path for path in sweep.iterdir() if (path / "result.json").exists())
    assert len(rows) == len(jobs) == 2
    for row in rows:
        match = [json.loads((job / "result.json").read_text()) for job in jobs
                 if json.loads((job / "result.json").read_text())["model"]["dense"] == int(row["model.dense"])]
        for name in FINDINGS:
            assert float(row[f"test/auroc/{name}"]) == pytest.approx(match[0]["metrics"][f"test/auroc/{name}"])


def test_a_multilabel_run_extended_by_more_epochs_matches_one_run_straight_through(make_cfg, nih_root, tmp_path):
    quick = (*runner_overrides(nih_root), "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    straight = run(make_cfg("data=nih", *quick, "trainer.epochs=4"), tmp_path / "straight")
    run(make_cfg("data=nih", *quick, "trainer.epochs=2", "trainer.keep_last=true"), tmp_path / "extended")
    extended = run_safely(make_cfg("data=nih", *quick, "trainer.epochs=4", "trainer.resume=true"),
                          tmp_path / "extended", [])
    assert extended["status"] == "ok" and len(extended["threshold"]) == len(FINDINGS)
    assert extended["history"] == straight["history"]
    assert extended["metrics"] == straight["metrics"]


@pytest.mark.parametrize("cells, overrides, expected", [
    (["1", "2"], ["data.label_columns=[A,B]"], "line 3: label '2' is not 1, 0, -1 (uncertain) or blank"),
    (["1", "0"], ["data.label_column=A", "data.labels=[A]"],
     "data.labels picks the findings of multi-label data (data.label_columns or data.label_separator)"),
    (["1", "0"], ["data.label_columns=[A,C]"], "has no column 'C' (data.label_columns[1])"),
])
def test_multilabel_csv_mistakes_are_one_line_naming_the_line_or_key(tmp_path, make_cfg, cells, overrides, expected):
    for name in ("a.png", "b.png"):
        Image.new("L", (40, 40)).save(tmp_path / name)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Path", "A", "B", "Split"], ["a.png", "0", "1", "train"], ["b.png", *cells, "test"]])
    cfg = make_cfg("data=csv", f"data.csv={tmp_path / 't.csv'}", "data.split_column=Split", *overrides)
    with pytest.raises(DataError) as error:
        load_dataset(cfg.data)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_label_columns_and_a_separator_together_are_refused_before_any_work(make_cfg, tmp_path):
    record = run_safely(make_cfg("data=csv", "debug=smoke", f"data.csv={tmp_path / 'none.csv'}",
                                 "data.label_columns=[A]", "data.label_separator=';'"), tmp_path / "run", [])
    assert record["status"] == "failed" and record["error"].startswith("data.label_columns and data.label_separator")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_multilabel_sweep_runs_under_the_parallel_launchers(nih_root, tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "cxr.train", "-m", f"hydra/launcher={launcher}", "data=nih",
                           *runner_overrides(nih_root), "trainer.epochs=2", "trainer.tensorboard_images=false",
                           "model.dense=8,16", f"hydra.sweep.dir={sweep}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/result.json"))]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(len(r["threshold"]) == 3 for r in records)
    assert "## Test AUROC per finding" in (sweep / "results.md").read_text()


@pytest.mark.slow
def test_torchrun_gathers_each_multilabel_test_image_once_as_one_process_predicts_it(nih_root, tmp_path):
    """2 processes, 40 test images: rank 0's per-image, per-finding probabilities equal cxr.predict's
    in one process, and the per-finding AUROCs are those of the gathered predictions."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cxr.train", "data=nih", *runner_overrides(nih_root), "trainer.epochs=2",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["world_size"] == 2 and result["data"]["test"] == 40
    with open(run_dir / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({row["path"] for row in rows}) == 40
    output = tmp_path / "single.csv"
    assert predict_main([f"checkpoint={run_dir / 'best.pt'}", f"inputs={nih_root / 'images_001' / 'images'}",
                         f"output={output}", "device=cpu"]) == 0
    with open(output, newline="") as f:
        single = {row["path"]: row for row in csv.DictReader(f)}
    for row in rows:  # training read the frozen features as cached, in float16; predict computes them anew
        for name in FINDINGS:
            assert float(row[f"prob_{name}"]) == pytest.approx(float(single[row["path"]][f"prob_{name}"]), abs=1e-3)
    probs = np.array([[float(row[f"prob_{name}"]) for name in FINDINGS] for row in rows])
    for k, name in enumerate(FINDINGS):
        expected = roc_auc_score(truth_matrix(rows, FINDINGS)[:, k], probs[:, k])
        assert result["metrics"][f"test/auroc/{name}"] == pytest.approx(expected, abs=1e-5)


def test_data_labels_picks_and_orders_label_columns(make_cfg, tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (40, 40)).save(tmp_path / name)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Path", "A", "B", "C", "Split"], ["a.png", "1", "0", "-1", "train"],
                                 ["b.png", "0", "", "1", "train"], ["c.png", "1", "1", "0", "test"]])
    cfg = make_cfg("data=csv", f"data.csv={tmp_path / 't.csv'}", "data.split_column=Split", "data.val_fraction=0.5",
                   "data.label_columns=[A,B,C]", "data.labels=[C,A]", "data.image_size=32")
    dataset = load_dataset(cfg.data)
    assert dataset.classes == ["C", "A"]
    splits = (dataset.train, dataset.val, dataset.test)
    by_path = dict(zip([p for split in splits for p in split.paths],
                       torch.cat([split.labels for split in splits]).tolist(), strict=True))
    assert {Path(p).name: v for p, v in by_path.items()} == {"a.png": [-1, 1], "b.png": [1, 0], "c.png": [0, 1]}


def test_item12_rare_findings_get_intervals_and_the_macro_interval_keeps_its_findings():
    """Issue 20 item 12: images were resampled as one group, so a rare finding's resamples often
    lacked positives (no interval) and the macro mean averaged a different set of findings in each
    resample. Each finding is now resampled within its positives, negatives and unknowns, and the
    macro within the images' label combinations: every resample keeps every finding's counts."""
    rng = np.random.default_rng(0)
    n = 300
    labels = (rng.random((n, 3)) < [0.4, 0.3, 0.0]).astype(int)
    labels[:3, 2] = 1  # a rare finding: 3 positives in 300
    labels[rng.random((n, 3)) < 0.1] = -1  # unknowns, masked out
    probs = np.clip(0.35 * (labels == 1) + 0.65 * rng.random((n, 3)), 0, 1)
    task = Task.of(FINDINGS, multilabel=True)
    point = task.metrics(labels, probs, [0.5] * 3)
    intervals = task.intervals(labels, probs, [0.5] * 3, resamples=200, seed=0)
    for name in ("auroc/Pneumonia", "sensitivity/Pneumonia", "auroc", "sensitivity"):
        assert intervals[name] is not None, name  # None before: some resamples had no positive
        low, high = intervals[name]
        assert low <= point[name] <= high, name
    # the macro's strata keep each finding's positives, negatives and unknowns in every resample
    draw = np.concatenate([rng.choice(members, len(members)) for members in task.strata(labels)])
    for value in (1, 0, -1):
        np.testing.assert_array_equal((labels[draw] == value).sum(0), (labels == value).sum(0))
    # a finding undefined on the whole split (no positive) is left out of the macro alike in every
    # resample: adding one does not move the macro intervals
    with_absent = np.concatenate([labels, np.zeros((n, 1), dtype=int)], 1)
    wider = Task.of([*FINDINGS, "Hernia"], multilabel=True).intervals(
        with_absent, np.concatenate([probs, rng.random((n, 1))], 1), [0.5] * 4, resamples=200, seed=0)
    assert wider["auroc"] == intervals["auroc"] and wider["auroc/Hernia"] is None

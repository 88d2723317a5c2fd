"""Train here, test there, end to end (slow): a model trained on cxr-real scored on the same pictures
laid out as NIH ChestX-ray14 and as CheXpert, an RSNA-trained model scored on the Kaggle layout, and
a multirun over checkpoints and datasets ending with its transfer table.

The oracle of each score is cxr.predict's probabilities on the same files, with the truth read from
the class folder each picture came from (not from the layout the evaluation parsed), through
scikit-learn's AUROC. NIH's layout holds PNG files only (cxr.data.layouts.nih_images), so its copy
of each JPEG is the picture cxr.pixels decodes, saved losslessly; CheXpert's lists JPEGs, so its
copies are the files' own bytes, decoded as the training run decoded them.
"""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxr.checkpoint import load_classifier
from cxr.evaluate import run_safely
from cxr.predict import classify
from cxr.train import run
from tests.conftest import REPO
from tests.test_dicom_runs import CLASSES, RECIPE, rsna_layout
from tests.test_evaluate import SMOKE, evaluate_cfg, markdown_tables, nih_layout, read_rows

pytestmark = pytest.mark.slow


def real_pictures(shared_data: Path) -> list[tuple[Path, str, str]]:
    """cxr-real's (image, class, split), in folder order."""
    return [(path, label, split) for split in ("train", "val", "test") for label in CLASSES
            for path in sorted((shared_data / "cxr-real" / split / label).iterdir())]


def chexpert_layout(root: Path, pictures: list[tuple[Path, str, str]]) -> dict[str, str]:
    """(image, class, split) as CheXpert lays them out: <root>/{train,valid}/patientNNNNN/study1/
    view1_frontal.jpg (the JPEG's own bytes) listed in train.csv and valid.csv (the test split)
    by paths that start with the root's name, Pneumonia 1.0 or blank (negative). {image: its copy}."""
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Pneumonia"
    tables, written = {"train": [header], "valid": [header]}, {}
    for k, (image, label, split) in enumerate(pictures):
        table = "valid" if split == "test" else "train"
        relative = f"{root.name}/{table}/patient{k:05d}/study1/view1_frontal.jpg"
        (root.parent / relative).parent.mkdir(parents=True)
        shutil.copyfile(image, root.parent / relative)
        no_finding, pneumonia = ("", "1.0") if label == "PNEUMONIA" else ("1.0", "")
        tables[table].append(f"{relative},Female,50,Frontal,PA,{no_finding},{pneumonia}")
        written[str(image)] = str(root.parent / relative)
    for table, lines in tables.items():
        (root / f"{table}.csv").write_text("\n".join(lines) + "\n")
    return written


def predicted_auroc(checkpoint: Path, files: list[str], truth: list[str]) -> tuple[float, list[dict]]:
    """AUROC of cxr.predict's P(PNEUMONIA) on `files` against their classes, and its rows."""
    model, task, settings = load_classifier(checkpoint, torch.device("cpu"))
    rows = classify(model, task, settings, [Path(f) for f in files], torch.device("cpu"), 128)
    return roc_auc_score([t == "PNEUMONIA" for t in truth], [float(row["prob_PNEUMONIA"]) for row in rows]), rows


@pytest.fixture(scope="module")
def trained(shared_data, make_cfg, tmp_path_factory) -> Path:
    """A model trained on cxr-real's JPEGs (the README's offline recipe, shortened): its folder."""
    out = tmp_path_factory.mktemp("kaggle-run")
    assert run(make_cfg("data=chest_xray", f"data.root={shared_data / 'cxr-real'}", *RECIPE), out)["status"] == "ok"
    return out


@pytest.mark.parametrize("layout", ["nih", "chexpert"])
def test_the_same_pictures_in_another_layout_score_as_predict_scores_them(trained, shared_data, tmp_path, layout):
    pictures = real_pictures(shared_data)
    root = tmp_path / {"nih": "ChestX-ray14", "chexpert": "CheXpert-v1.0-small"}[layout]
    root.mkdir()
    copies = {"nih": nih_layout, "chexpert": chexpert_layout}[layout](root, pictures)
    record = run_safely(evaluate_cfg(f"checkpoint={trained}", f"data={layout}", f"data.root={root}",
                                     "labels=pneumonia", "trainer.bootstrap=200"), tmp_path / "eval", [])
    assert record["status"] == "ok", record["error"]
    assert record["pairs"] == {"Pneumonia": "PNEUMONIA"} and record["data"]["images"] == 312
    class_of = {copies[str(image)]: label for image, label, _ in pictures}
    rows = read_rows(tmp_path / "eval" / "test_predictions.csv")
    assert sorted(row["path"] for row in rows) == sorted(copies[str(image)] for image, _, split in pictures
                                                         if split == "test")
    oracle, predicted = predicted_auroc(trained / "best.pt", [row["path"] for row in rows],
                                        [class_of[row["path"]] for row in rows])
    assert [row["prob_Pneumonia"] for row in rows] == [row["prob_PNEUMONIA"] for row in predicted]
    assert abs(record["metrics"]["test/auroc"] - oracle) < 1e-9
    low, high = record["intervals"]["test/auroc"]
    assert low < oracle < high and 0.8 < oracle
    # the training run scored the same pictures through its cached float16 backbone features: the
    # same ranking up to their rounding
    with open(trained / "test_predictions.csv", newline="") as f:
        own = [(row["truth"] == "PNEUMONIA", float(row["prob_PNEUMONIA"])) for row in csv.DictReader(f)]
    assert abs(roc_auc_score(*zip(*own, strict=True)) - oracle) < 0.005


def test_an_rsna_model_scored_on_the_kaggle_layout(shared_data, make_cfg, tmp_path):
    """Trained on cxr-real's pictures as RSNA DICOMs, scored on cxr-real's JPEG test split: the same
    class names pair themselves."""
    rsna_layout(shared_data, tmp_path / "rsna")
    out = tmp_path / "rsna-run"
    assert run(make_cfg("data=rsna", f"data.root={tmp_path / 'rsna'}", *RECIPE), out)["status"] == "ok"
    record = run_safely(evaluate_cfg(f"checkpoint={out}", "data=chest_xray",
                                     f"data.root={shared_data / 'cxr-real'}"), tmp_path / "eval", [])
    assert record["status"] == "ok", record["error"]
    assert record["pairs"] == {"PNEUMONIA": "PNEUMONIA"} and record["checkpoint"]["trained_on"] == "rsna"
    rows = read_rows(tmp_path / "eval" / "test_predictions.csv")
    assert len(rows) == 312 and all(Path(row["path"]).parent.name == row["truth"] for row in rows)
    oracle, _ = predicted_auroc(out / "best.pt", [row["path"] for row in rows], [row["truth"] for row in rows])
    assert abs(record["metrics"]["test/auroc"] - oracle) < 1e-9 and oracle > 0.8


def test_a_multirun_over_checkpoints_and_datasets_ends_with_the_transfer_table(make_cfg, tmp_path):
    """A binary and a multi-label model (debug=smoke) x the embedded Kaggle and NIH layouts, through
    the command a user types; `python -m cxr.aggregate` rebuilds the same table."""
    own = {}
    for name, data in (("kaggle-run", "synthetic"), ("nih-run", "synthetic_multilabel")):
        own[data] = run(make_cfg(f"data={data}", *SMOKE), tmp_path / name)["metrics"]["test/auroc"]
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "cxr.evaluate", "-m",
               f"checkpoint={tmp_path / 'kaggle-run'},{tmp_path / 'nih-run'}", "data=synthetic,synthetic_multilabel",
               "labels=pneumonia", "data.limit=32", "trainer.device=cpu", "trainer.bootstrap=20",
               f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    main = markdown_tables(sweep / "transfer.md")[0]
    assert [row[0] for row in main] == ["Trained on \\ tested on", "synthetic", "synthetic_multilabel"]
    assert main[0][1:] == ["synthetic", "synthetic_multilabel"]
    for k, data in enumerate(("synthetic", "synthetic_multilabel"), start=1):  # each model on its own test split
        assert main[k][k].startswith(f"{own[data]:.3f} [")
    assert all(" / " in cell for row in main[1:] for cell in row[1:])
    assert [row["status"] for row in read_rows(sweep / "transfer.csv")] == ["ok"] * 4
    written = {name: (sweep / name).read_text() for name in ("transfer.md", "transfer.csv")}
    for name in written:
        (sweep / name).unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "cxr.aggregate", str(sweep)], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert rebuilt.returncode == 0 and {name: (sweep / name).read_text() for name in written} == written

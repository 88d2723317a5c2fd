"""data=csv: any single-label dataset listed in a CSV, on real and generated images.

The oracles are written here without cxr's helpers: patients are read off the Kaggle file names by
string splitting, splits come from the folder a file lies in, and classes from the images drawn.
"""

import csv
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxr.data import DataError, load_dataset, patient_id, subset
from cxr.predict import main as predict_main
from cxr.task import Task
from cxr.train import run, run_safely
from tests.conftest import REPO

# the frozen recipe at 32 px: features are computed once, both runs of a comparison share them
FAST = ("model.weights=null", "model.freeze_backbone=true", "data.image_size=32", "trainer.epochs=3",
        "trainer.device=cpu", "trainer.progress=false", "trainer.bootstrap=20",
        "trainer.tensorboard_images=false")


def kaggle_patient(name: str) -> str:
    """person12_bacteria_3.jpeg -> PERSON12; NORMAL2-IM-0123-0001.jpeg -> NORMAL2-IM-0123."""
    if name.startswith("person"):
        return name.split("_")[0].upper()
    parts = name.split("-")
    return "-".join(parts[:3] if name.startswith("NORMAL2-") else parts[:2])


def write_csv(path, header, rows) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def real_csv(shared_data, tmp_path_factory):
    """cxr-real as a CSV: relative path, label and split from the folders, patient from the name.

    Rows are written in reverse order, so matching results cannot come from the row order.
    """
    real = shared_data / "cxr-real"
    rows = [(str(image.relative_to(real)), image.parent.name, kaggle_patient(image.name), image.parts[-3])
            for image in sorted(real.glob("*/*/*.jpeg"))]
    path = tmp_path_factory.mktemp("real-csv") / "labels.csv"
    write_csv(path, ["Path", "Finding", "Patient ID", "Split"], rows[::-1])
    return path, real, rows


@pytest.mark.slow
def test_real_data_through_csv_matches_the_folders(real_csv, make_cfg, tmp_path):
    path, real, rows = real_csv
    # the CSV's val rows are its validation (issue 20 item 4), as val/ is the folders' with val_split=official
    folders = make_cfg("data=chest_xray", f"data.root={real}", "data.val_split=official", *FAST)
    table = make_cfg("data=csv", f"data.csv={path}", f"data.root={real}", "data.label_column=Finding",
                     "data.patient_column=Patient ID", "data.split_column=Split", *FAST)
    a, b = load_dataset(folders.data), load_dataset(table.data)
    for split in ("train", "val", "test"):
        assert getattr(a, split).paths == getattr(b, split).paths
        assert getattr(a, split).labels.tolist() == getattr(b, split).labels.tolist()
        # the oracle: each split is its folder
        assert sorted(getattr(b, split).paths) == sorted(str(real / r[0]) for r in rows if r[3] == split)

    run(folders, tmp_path / "folders", overrides=[])
    run(table, tmp_path / "csv", overrides=[])
    ra, rb = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("folders", "csv"))
    assert rb["status"] == "ok" and rb["data"]["name"] == "csv"
    for key in ("classes", "train", "val", "test", "skipped_files"):
        assert ra["data"][key] == rb["data"][key]
    assert rb["metrics"] == pytest.approx(ra["metrics"], rel=1e-5, abs=1e-6)
    assert read_rows(tmp_path / "csv" / "test_predictions.csv") == \
        read_rows(tmp_path / "folders" / "test_predictions.csv")


# three classes drawn so that a small model tells them apart: a bright band at the top, middle or
# bottom of a noisy field
CLASSES = ("upper", "middle", "lower")


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """90 PNGs (30 per class, 3 images per patient) and a CSV beside them with absolute paths."""
    folder = tmp_path_factory.mktemp("drawn")
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(CLASSES):
        for k in range(30):
            pixels = rng.integers(0, 90, (48, 48)).astype(np.uint8)
            pixels[label * 16:(label + 1) * 16] += 120
            image = folder / "images" / f"{name}_{k:02d}.png"
            image.parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(image)
            rows.append((str(image), name, f"p{label}-{k // 3}"))
    write_csv(folder / "table.csv", ["Image", "Class", "Patient"], rows)
    return folder / "table.csv", rows


def test_three_classes_train_end_to_end_with_test_carved_by_patient(drawn, make_cfg, tmp_path):
    path, rows = drawn
    cfg = make_cfg("data=csv", f"data.csv={path}", "data.path_column=Image", "data.label_column=Class",
                   "data.patient_column=Patient", f"data.classes=[{','.join(CLASSES)}]", "debug=smoke",
                   "model.weights=null", "data.test_fraction=0.3")
    result = run(cfg, tmp_path, overrides=[])
    assert result["status"] == "ok"
    data = json.loads((tmp_path / "result.json").read_text())["data"]
    assert data["classes"] == list(CLASSES)  # data.classes' order, not sorted
    assert data["train"] + data["val"] + data["test"] == 90
    assert 24 <= data["test"] <= 30  # 30% of each class, to within one patient (3 images)
    patient = {image: who for image, _, who in rows}
    dataset = load_dataset(cfg.data)
    sides = [{patient[p] for p in split.paths} for split in (dataset.train, dataset.val, dataset.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    predictions = read_rows(tmp_path / "test_predictions.csv")
    assert [c for c in predictions[0] if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    # predict, from the checkpoint alone, gives the labels the run gave its test images
    assert predict_main([f"checkpoint={tmp_path / 'best.pt'}", f"inputs={path.parent / 'images'}",
                         f"output={tmp_path / 'predicted.csv'}", "device=cpu"]) == 0
    predicted = {row["path"]: row["label"] for row in read_rows(tmp_path / "predicted.csv")}
    assert len(predicted) == 90
    assert {row["path"]: row["label"] for row in predictions} == {p: predicted[p] for p in dataset.test.paths}


def test_a_csv_without_val_rows_carves_validation_by_patient_as_the_folders_do(real_csv, make_cfg, tmp_path):
    path, real, rows = real_csv
    without_val = tmp_path / "train_test.csv"  # what a from_train run of the folders reads: val/ set aside
    write_csv(without_val, ["Path", "Finding", "Patient ID", "Split"], [r for r in rows if r[3] != "val"])
    folders = make_cfg("data=chest_xray", f"data.root={real}", *FAST)
    table = make_cfg("data=csv", f"data.csv={without_val}", f"data.root={real}", "data.label_column=Finding",
                     "data.patient_column=Patient ID", "data.split_column=Split", *FAST)
    a, b = load_dataset(folders.data), load_dataset(table.data)
    for split in ("train", "val", "test"):
        assert getattr(a, split).paths == getattr(b, split).paths
    # the oracle: val is carved from the train rows alone, no patient on both sides
    assert sorted(b.train.paths + b.val.paths) == sorted(str(real / r[0]) for r in rows if r[3] == "train")
    patient = {str(real / r[0]): r[2] for r in rows}
    assert not {patient[p] for p in b.train.paths} & {patient[p] for p in b.val.paths}


def test_item4_csv_val_rows_are_used_not_dropped(drawn, make_cfg, tmp_path, caplog):
    """Issue 20 item 4: a CSV's val rows are its validation split (with data.val_split=from_train,
    the default, they were dropped without a word), so result.json's counts add up to the CSV's
    rows minus the unreadable files it lists as skipped."""
    _, drawn_rows = drawn
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    # by patient (p<class>-<0..9>): 0-5 train, 6-7 val, 8-9 test
    split_of = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    rows = [(image, name, who, split_of[int(who.split("-")[1])]) for image, name, who in drawn_rows]
    rows.append((str(broken), "upper", "p0-7", "val"))
    write_csv(tmp_path / "table.csv", ["Image", "Class", "Patient", "Split"], rows)
    cfg = make_cfg("data=csv", f"data.csv={tmp_path / 'table.csv'}", "data.path_column=Image",
                   "data.label_column=Class", "data.patient_column=Patient", "data.split_column=Split",
                   "debug=smoke", "model.weights=null", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    with caplog.at_level(logging.INFO, logger="cxr"):
        assert run(cfg, tmp_path / "run", overrides=[])["status"] == "ok"
    data = json.loads((tmp_path / "run" / "result.json").read_text())["data"]
    on_disk = read_rows(tmp_path / "table.csv")
    assert data["skipped"] == {str(broken): "not an image file"} and data["skipped_files"] == 1
    assert data["train"] + data["val"] + data["test"] == len(on_disk) - data["skipped_files"] == 90
    for split in ("train", "val", "test"):
        assert data[split] == sum(row["Split"] == split and row["Image"] != str(broken) for row in on_disk)
    assert any("val rows" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
def test_item5_per_image_patients_warn_once_and_are_recorded_in_result_json(drawn, make_cfg, tmp_path, caplog):
    """Issue 20 item 5: with no patient column and file names cxr does not know (upper_00.png),
    each image is its own patient: said once in a warning and in result.json's data.patients."""
    path, rows = drawn
    table = ("data=csv", f"data.csv={path}", "data.path_column=Image", "data.label_column=Class", "debug=smoke")
    cfg = make_cfg(*table, "model.weights=null", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    with caplog.at_level(logging.WARNING, logger="cxr"):
        assert run(cfg, tmp_path / "run", overrides=[])["status"] == "ok"
    data = json.loads((tmp_path / "run" / "result.json").read_text())["data"]
    assert data["patients"] == "per image"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "patient" in r.getMessage()]
    assert len(warnings) == 1 and f"{len(rows)} of {len(rows)} images" in warnings[0], warnings
    # the drawn CSV's patient column names them instead, and nothing is said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxr"):
        dataset = load_dataset(make_cfg(*table, "data.patient_column=Patient").data)
    assert dataset.patients == "column Patient" and not caplog.records


def test_item5_per_image_patients_are_one_per_image_whatever_their_file_names():
    # the same file name in two class folders is two images, so two patients (the file stem made them one)
    first, how = patient_id("/data/NORMAL/0001.png")
    second, _ = patient_id("/data/PNEUMONIA/0001.png")
    assert how == "per image" and first != second


def test_item5_an_empty_patient_cell_is_one_line(tmp_path, make_cfg):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (40, 40)).save(tmp_path / name)
    write_csv(tmp_path / "t.csv", ["Path", "Label", "Patient"], [("a.png", "x", "p1"), ("b.png", "y", ""),
                                                                   ("c.png", "y", "p2")])
    cfg = make_cfg("data=csv", f"data.csv={tmp_path / 't.csv'}", "data.patient_column=Patient")
    with pytest.raises(DataError) as error:
        load_dataset(cfg.data)
    assert "line 3: empty patient cell in column Patient" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("rows, overrides, expected", [
    ([("a.png", "x", "train"), ("b.png", "z", "test")], ["data.classes=[x,y]"],
     "line 3: label 'z' is not in data.classes ['x', 'y']; add it there or remove the row"),
    ([("a.png", "x", "train"), ("b.png", "y", "validation")], [],
     "line 3: split 'validation' in data.split_column must be one of train|val|test"),
    ([("a.png", "x", "train"), ("a.png", "y", "test")], [], "is listed again (first on line 2)"),
    ([("a.png", "x", "train"), ("b.png", "y", "train")], [], "has no test rows in column 'Split'"),
    ([("a.png", "x", "train"), ("b.png", "y", "test")], ["data.val_split=official"],
     "has no val rows in column 'Split' (data.split_column) (data.val_split=official reads them"),
])
def test_csv_content_mistakes_name_the_line_or_column(tmp_path, make_cfg, rows, overrides, expected):
    for name in ("a.png", "b.png"):
        Image.new("L", (40, 40)).save(tmp_path / name)
    write_csv(tmp_path / "t.csv", ["Path", "Label", "Split"], rows)
    cfg = make_cfg("data=csv", f"data.csv={tmp_path / 't.csv'}", "data.split_column=Split", *overrides)
    with pytest.raises(DataError) as error:
        load_dataset(cfg.data)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_limit_just_below_the_size_keeps_every_class():
    # 66 items of 3 classes cut to 64 leaves out 2, fewer than the classes: scikit-learn's
    # stratified split refuses that, and data.limit=64 (debug=smoke) hit it on small CSVs
    items = [(f"{k:02d}.png", k // 22) for k in range(66)]
    chosen = subset(items, 64, seed=0, task=Task.of(["a", "b", "c"], multilabel=False))
    assert len(chosen) == 64 and {label for _, label in chosen} == {0, 1, 2}


def test_unset_csv_is_one_line(make_cfg, tmp_path):
    result = run_safely(make_cfg("data=csv", "debug=smoke"), tmp_path, [])
    assert result["error"] == "data.csv is not set: pass data.csv=/path/to/labels.csv"


def train_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.train", "data=csv", "debug=smoke", "model.weights=null",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mistake", ["missing csv", "missing column", "missing image"])
def test_csv_mistakes_are_one_line(drawn, tmp_path, mistake):
    path, rows = drawn
    bad = tmp_path / "bad.csv"
    header, needle = ["Image", "Class", "Patient"], "data.csv"
    if mistake == "missing csv":
        bad, expected = tmp_path / "nowhere.csv", "does not exist"
    elif mistake == "missing column":
        header, expected = ["Image", "Diagnosis", "Patient"], "no column 'Class' (data.label_column)"
        write_csv(bad, header, rows)
    else:
        rows = [*rows[:5], (str(tmp_path / "gone.png"), "upper", "p9"), *rows[5:]]
        write_csv(bad, header, rows)
        expected = f"line 7: image not found: {tmp_path / 'gone.png'}"
    proc = train_command(f"data.csv={bad}", "data.path_column=Image", "data.label_column=Class",
                         f"hydra.run.dir={tmp_path / 'run'}")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if needle in line]
    assert len(lines) == 1 and expected in lines[0], output


@pytest.mark.slow
def test_a_csv_run_resumes_after_the_csv_moved(drawn, make_cfg, tmp_path):
    path, _ = drawn
    moved = tmp_path / "elsewhere" / "table.csv"  # data.csv, like data.root, may move between runs
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    common = ("data=csv", "data.path_column=Image", "data.label_column=Class", "debug=smoke",
              "model.weights=null", "trainer.bootstrap=0", "trainer.tensorboard_images=false",
              "trainer.keep_last=true")
    first = run(make_cfg(*common, f"data.csv={path}"), tmp_path / "run")
    extended = run_safely(make_cfg(*common, f"data.csv={moved}", "trainer.resume=true", "trainer.epochs=3"),
                          tmp_path / "run", [])
    assert extended["status"] == "ok", extended["error"]
    assert extended["history"][:2] == first["history"] and len(extended["history"]) == 3

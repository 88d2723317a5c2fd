"""End to end on real radiographs ($CXR_SHARED_DATA/cxr-real): a model trained on the JPEGs decides
the same on the same pictures as 16-bit PNG and DICOM files, data=rsna trains on an RSNA-layout
copy, and no header value of a DICOM run's inputs appears in any file the run writes (slow).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.bench.images import save_dicom
from cxr.checkpoint import load_classifier
from cxr.pixels import read_picture
from cxr.predict import classify, main
from cxr.train import run
from tests.conftest import REPO
from tests.test_dicom import CLASSES, RESCALE, window_over

pytestmark = pytest.mark.slow

# the README's offline recipe on cxr-real, shortened for a test
RECIPE = ("model.weights=null", "model.freeze_backbone=true", "data.image_size=64", "trainer.epochs=10",
          "trainer.bootstrap=0", "trainer.tensorboard_images=false", "trainer.progress=false", "trainer.device=cpu")


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


@pytest.fixture(scope="module")
def trained(shared_data, make_cfg, tmp_path_factory):
    """A model trained on cxr-real's JPEGs: its best.pt."""
    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg("data=chest_xray", f"data.root={shared_data / 'cxr-real'}", *RECIPE)
    assert run(cfg, out)["status"] == "ok"
    return out / "best.pt"


@pytest.fixture(scope="module")
def copies(shared_data, tmp_path_factory) -> dict[str, list[Path]]:
    """cxr-real's test split as its JPEGs, and the same pictures (greys as PIL decodes the JPEG) as
    16-bit PNG (x 257), 8-bit DICOM and 12-bit MONOCHROME1 DICOM with a rescale and a window."""
    base = tmp_path_factory.mktemp("copies")
    jpegs = sorted(path for label in CLASSES for path in (shared_data / "cxr-real" / "test" / label).iterdir())
    formats = {"jpeg": jpegs, "png16": [], "dicom8": [], "dicom12": []}
    for k, path in enumerate(jpegs):
        picture = grey(path)
        for name in ("png16", "dicom8", "dicom12"):
            (base / name).mkdir(exist_ok=True)
            formats[name].append(base / name / f"image-{k:04d}.{'png' if name == 'png16' else 'dcm'}")
        Image.fromarray(picture.astype(np.uint16) * 257).save(formats["png16"][-1])
        save_dicom(picture, formats["dicom8"][-1])
        save_dicom(picture, formats["dicom12"][-1], bits=12, monochrome1=True, rescale=RESCALE,
                   window=window_over(0, 255, 12, monochrome1=True))
    return formats


def test_the_same_picture_gets_the_same_decision_in_every_format(trained, copies):
    model, task, settings = load_classifier(trained, torch.device("cpu"))
    rows = {name: classify(model, task, settings, files, torch.device("cpu"), batch_size=64)
            for name, files in copies.items()}
    reference = rows.pop("jpeg")
    probs = np.array([[float(row[f"prob_{c}"]) for c in CLASSES] for row in reference])
    assert len(reference) == 312 and 0.1 < probs[:, 1].mean() < 0.9  # a model that tells them apart
    for name, other in rows.items():
        assert [row["status"] for row in other] == ["ok"] * len(reference), name
        assert [row["label"] for row in other] == [row["label"] for row in reference], name
        other_probs = np.array([[float(row[f"prob_{c}"]) for c in CLASSES] for row in other])
        assert np.abs(other_probs - probs).max() < 0.01, name


def test_predict_and_grad_cam_on_a_dicom_folder_draw_on_the_windowed_picture(trained, copies, tmp_path):
    """A MONOCHROME1 12-bit file's overlay is its 16-bit PNG copy's (the same picture), at its
    size: drawn on the windowed picture, bone bright, not on the file's raw values."""
    inputs = tmp_path / "inputs"
    for name in ("dicom12", "png16"):
        (inputs / name).mkdir(parents=True)
        for k in (0, 200):
            (inputs / name / copies[name][k].name).symlink_to(copies[name][k])
    (inputs / "dicom12" / "SCAN0001").symlink_to(copies["dicom12"][1])  # no suffix: found by its preamble
    output, cams = tmp_path / "predictions.csv", tmp_path / "cams"
    assert main([f"checkpoint={trained}", f"inputs={inputs}", f"output={output}", f"gradcam={cams}"]) == 0
    with open(output, newline="") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok"] * 5
    for k in (0, 200):
        stem = copies["png16"][k].stem
        dicom, png = (np.asarray(Image.open(cams / name / f"{stem}.png"), np.int64) for name in ("dicom12", "png16"))
        assert dicom.shape == png.shape == (*grey(copies["jpeg"][k]).shape, 3)
        assert np.abs(dicom - png).mean() < 2


def rsna_layout(shared_data: Path, root: Path) -> dict[str, str]:
    """cxr-real's 1,252 pictures as stage_2_train_images/<patientId>.dcm (12-bit, rescaled), a
    pneumonia image with one to three box rows, a normal one with a row of Target 0: {patientId: class}."""
    rng = np.random.default_rng(0)
    (root / "stage_2_train_images").mkdir(parents=True)
    lines, labels = ["patientId,x,y,width,height,Target"], {}
    for split in ("train", "val", "test"):
        for label in CLASSES:
            for path in sorted((shared_data / "cxr-real" / split / label).iterdir()):
                patient = f"{rng.integers(16**8):08x}-{rng.integers(16**4):04x}-{len(labels):05d}"
                save_dicom(grey(path), root / "stage_2_train_images" / f"{patient}.dcm", bits=12, rescale=RESCALE)
                boxes = int(rng.integers(1, 4)) if label == "PNEUMONIA" else 0
                lines += [f"{patient},{100 + k},200,150,300,1" for k in range(boxes)] or [f"{patient},,,,,0"]
                labels[patient] = label
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    return labels


def test_rsna_layout_trains_and_evaluates_end_to_end(shared_data, make_cfg, tmp_path):
    """cxr-real's pictures in the RSNA layout (`rsna_layout`): trained and tested through data=rsna."""
    root = tmp_path / "rsna"
    labels = rsna_layout(shared_data, root)
    result = run(make_cfg("data=rsna", f"data.root={root}", *RECIPE), tmp_path / "run")
    data = result["data"]
    assert result["status"] == "ok" and data["classes"] == list(CLASSES) and data["patients"] == "column patientId"
    assert data["train"] + data["val"] + data["test"] == len(labels) == 1252 and data["skipped_files"] == 0
    assert abs(data["test"] / len(labels) - 0.2) < 0.01
    with open(tmp_path / "run" / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["truth"] for row in rows} == set(CLASSES)
    assert all(row["truth"] == labels[Path(row["path"]).stem] for row in rows)  # one label per image, any box
    assert result["metrics"]["test/auroc"] > 0.85


# the header values of the privacy run's inputs: none may appear in anything it writes
IDENTITY = {"PatientName": "Quixote^Dulcinea^Marguerite", "PatientBirthDate": "19230417",
            "PatientSex": "F", "InstitutionName": "Saint Zebedee Infirmary", "AccessionNumber": "ACC99887766",
            "ReferringPhysicianName": "Okonkwo^Adaeze", "StudyDate": "20240229", "OtherPatientIDs": "OPI-55501"}


def patient_header(k: int) -> dict:
    """The k-th file's identity: two images per patient."""
    return {**IDENTITY, "PatientID": f"MRN-7{k // 2:05d}-QX", "PatientName": f"Quixote^Dulcinea^{k // 2:03d}"}


def test_no_header_value_of_a_dicom_run_reaches_any_output(shared_data, tmp_path):
    """A run of `python -m cxr.train` on DICOMs with data.patient_source=dicom (TensorBoard images,
    Grad-CAM and last.pt kept): every file it writes, and everything it prints, scanned as bytes."""
    from tests.test_dicom import bad_dicoms, kaggle_dicoms

    root = tmp_path / "data"
    good = list(kaggle_dicoms(shared_data, root, 24, header=patient_header))
    # skipped files are listed with their reasons; the bad DICOMs' headers are a patient's too
    bad = bad_dicoms(read_picture(good[0]), root / "train" / "NORMAL", patient_header(len(good)))
    written = good + [str(root / "train" / "NORMAL" / name) for name in bad if name != "page.dcm"]
    values = {value for k in range(len(good) + 1) for name, value in patient_header(k).items()
              if name != "PatientSex"}  # one letter: found in any file
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "cxr.train", "data=chest_xray", f"data.root={root}", "data.patient_source=dicom",
               "model.weights=null", "model.freeze_backbone=true", "data.image_size=64", "trainer.epochs=2",
               "trainer.bootstrap=0", "trainer.keep_last=true", "trainer.device=cpu",
               f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["data"]["patients"] == "DICOM PatientID (salted hash), per image for 1 of 53 images"
    assert result["data"]["skipped_files"] == 5
    outputs = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert {".hydra", "best.pt", "last.pt", "result.json", "test_predictions.csv"} <= {p.name for p in outputs} | {
        p.parent.name for p in outputs} and any("tfevents" in p.name for p in outputs)
    outputs["stdout"], outputs["stderr"] = done.stdout, done.stderr
    inputs = b"".join(Path(path).read_bytes() for path in written)
    for value in values:
        assert value.encode() in inputs  # the scan finds a value where there is one
        found = [str(where) for where, content in outputs.items() if value.encode() in content]
        assert not found, (value, found)

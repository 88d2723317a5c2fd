"""cxr.predict and Grad-CAM on a model trained here: generated images, and real full-size ones."""

import csv
import io
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cxr.batches import preprocess
from cxr.checkpoint import load_classifier
from cxr.data import load_dataset
from cxr.explain import grad_cam, overlay
from cxr.model import Classifier, FeatureNorm
from cxr.predict import classify, main
from cxr.task import Task
from cxr.train import run
from tests.conftest import CONF_DIR

CLASSES = ["NORMAL", "PNEUMONIA"]
BINARY = Task.of(CLASSES, multilabel=False)
SMOKE = ("debug=smoke", "data.limit=32", "trainer.epochs=1", "trainer.bootstrap=0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug=smoke run (Grad-CAM to TensorBoard included): its folder, result and config."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(SMOKE))
    out = tmp_path_factory.mktemp("run")
    return out, run(cfg, out, overrides=list(SMOKE)), cfg


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grad_cam_points_at_the_evidence_for_the_class():
    """A network whose 'layer4' passes a 4x4 image through and whose class 1 sums it up."""
    backbone = nn.Sequential(OrderedDict(layer4=nn.Identity(), flatten=nn.Flatten()))
    head = nn.Linear(16, 2)
    with torch.no_grad():
        head.weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
    model = Classifier(backbone, FeatureNorm(16), head)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2], x[0, 0, 3, 0] = 1.0, 0.5
    cams, logits = grad_cam(model, BINARY, x, target=1)
    assert torch.equal(cams[0], x[0, 0])  # peak 1 where the evidence is, half as much at (3, 0)
    assert logits[0, 1] == pytest.approx(1.5 + head.bias[1].item())
    cams, _ = grad_cam(model, BINARY, x, target=0)  # the same pixels count against class 0: no heat
    assert not cams.any()
    heat = overlay(np.zeros((40, 80), dtype=np.uint8), torch.eye(2))
    assert heat.shape == (40, 80, 3)
    # jet: red where the map is 1 (top left, bottom right), blue where it is 0
    assert heat[5, 5, 0] > heat[5, 5, 2] and heat[5, 75, 2] > heat[5, 75, 0]


def check_predictions(rows: list[dict]) -> None:
    for row in rows:
        assert row["status"] == "ok", row
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["label"] in CLASSES


@pytest.fixture
def mixed_folder(tmp_path):
    """Odd sizes, grayscale PNG and RGB JPEG in a subfolder, a corrupt file, macOS debris."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    (folder / "__MACOSX").mkdir()
    Image.fromarray(rng.integers(0, 256, (120, 300), dtype=np.uint8)).save(folder / "gray.png")
    rgb = rng.integers(0, 256, (210, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "sub" / "colour.JPG")
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "__MACOSX" / "._gray.png").write_bytes(b"resource fork")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_lists_unreadable_files_and_writes_overlays_at_input_size(trained, mixed_folder,
                                                                          tmp_path):
    out, _, _ = trained
    output, cams = tmp_path / "predictions.csv", tmp_path / "cams"
    assert main([f"checkpoint={out / 'best.pt'}", f"inputs={mixed_folder}", f"output={output}",
                 f"gradcam={cams}", "batch_size=2"]) == 0
    rows = {row["path"]: row for row in read_rows(output)}
    broken, gray, colour = (str(mixed_folder / name) for name in
                            ("broken.jpeg", "gray.png", "sub/colour.JPG"))
    assert sorted(rows) == sorted([broken, gray, colour])
    assert rows[broken]["status"] == "unreadable" and rows[broken]["label"] == ""
    check_predictions([rows[gray], rows[colour]])
    assert Image.open(cams / "gray.png").size == (300, 120)
    assert Image.open(cams / "sub" / "colour.png").size == (90, 210)
    assert not (cams / "broken.png").exists()


def test_predict_reproduces_the_test_metrics_from_the_checkpoint_alone(trained):
    """Same decoding, normalisation and threshold as training: the test confusion matrix again."""
    _, result, cfg = trained
    test = load_dataset(cfg.data).test
    model, task, settings = load_classifier(result["checkpoint"], torch.device("cpu"))
    files = [Path(p) for p in test.paths]
    rows = classify(model, task, settings, files, torch.device("cpu"), batch_size=16)
    predicted = [CLASSES.index(row["label"]) for row in rows]
    confusion = np.zeros((2, 2), dtype=int)
    np.add.at(confusion, (test.labels.numpy(), predicted), 1)
    assert confusion.tolist() == result["confusion"]


def test_training_logs_gradcam_to_tensorboard(trained):
    out, _, _ = trained
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    assert "test/gradcam" in events.Tags()["images"]


def test_a_folder_of_unreadable_files_is_one_line_listing_the_reasons(trained, tmp_path, caplog):
    from tests.test_dicom import bad_dicoms

    out, _, _ = trained
    reasons = bad_dicoms(np.zeros((32, 32), np.uint8), tmp_path / "exports")
    with caplog.at_level(logging.WARNING, logger="cxr.predict"):
        assert main([f"checkpoint={out / 'best.pt'}", f"inputs={tmp_path / 'exports'}",
                     f"output={tmp_path / 'predictions.csv'}"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"none of the 5 file(s) in {tmp_path / 'exports'} is a readable")
    assert all(reason in caplog.text for reason in reasons.values())
    assert [row["status"] for row in read_rows(tmp_path / "predictions.csv")] == ["unreadable"] * 5


def test_cli_refuses_bad_arguments(tmp_path, caplog):
    assert main(["checkpoint=x.pt", f"inputs={tmp_path}", "batchsize=4"]) == 1
    assert "batchsize" in caplog.text
    assert main(["checkpoint=x.pt"]) == 1
    assert "inputs" in caplog.text
    assert main(["checkpoint=x.pt", f"inputs={tmp_path / 'nowhere'}"]) == 1
    assert "does not exist" in caplog.text
    Image.new("L", (40, 40)).save(tmp_path / "x.png")
    assert main([f"checkpoint={tmp_path / 'missing.pt'}", f"inputs={tmp_path}"]) == 1
    assert "cannot read checkpoint" in caplog.text


def test_predict_on_full_size_real_images(trained, shared_data, tmp_path):
    """40 originals of 156-2,916 px, some RGB: one row each; Grad-CAM at the original size."""
    out, _, _ = trained
    folder = shared_data / "cxr-fullres"
    images = sorted(p for p in folder.rglob("*") if p.is_file())
    output = tmp_path / "predictions.csv"
    assert main([f"checkpoint={out / 'best.pt'}", f"inputs={folder}", f"output={output}"]) == 0
    rows = read_rows(output)
    assert [row["path"] for row in rows] == [str(p) for p in images]
    check_predictions(rows)

    rgb = next(p for p in images if Image.open(p).mode == "RGB")
    cams = tmp_path / "cams"
    assert main([f"checkpoint={out / 'best.pt'}", f"inputs={rgb}", f"output={output}",
                 f"gradcam={cams}"]) == 0
    assert Image.open(cams / rgb.with_suffix(".png").name).size == Image.open(rgb).size


# ---------------------------------------------------------------------------------------------
# Item 14: Grad-CAM of a frozen-backbone model, against occlusion sensitivity

SIDE, CELL = 64, 16  # the image, and the cells a lesion fills and occlusion paints
BACKGROUND = 90


def lesion_image(rng: np.random.Generator, cell: tuple[int, int] | None) -> np.ndarray:
    """A flat noisy film; with `cell`, one bright 16 px square lesion filling that cell."""
    image = rng.normal(BACKGROUND, 12, (SIDE, SIDE)).clip(0, 255)
    if cell is not None:
        image[cell[0] * CELL:(cell[0] + 1) * CELL, cell[1] * CELL:(cell[1] + 1) * CELL] = 230
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    """The embedded recipe (a frozen random-init ResNet50 at 64 px, its standardised features, the
    head trained on them) on a toy set where PNEUMONIA is one bright lesion in any of the 16 cells."""
    root = tmp_path_factory.mktemp("lesions")
    rng = np.random.default_rng(0)
    for split, count in (("train", 64), ("test", 8)):
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                cell = tuple(rng.integers(0, 4, 2)) if label == "PNEUMONIA" else None
                name = f"person{i}_bacteria_{i}.png" if cell else f"IM-{i:04d}-0001.png"
                Image.fromarray(lesion_image(rng, cell)).save(folder / name)
    overrides = ["data=chest_xray", f"data.root={root}", "model.weights=null", "model.freeze_backbone=true",
                 "data.image_size=64", "optimizer.lr=1e-3", "trainer.epochs=30", "trainer.bootstrap=0",
                 "trainer.device=cpu", "trainer.progress=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    out = root / "run"
    result = run(cfg, out, overrides=overrides)
    assert result["metrics"]["test/auroc"] > 0.95  # it has learned the lesion
    return out


def occlusion_drops(model, task, image: np.ndarray) -> np.ndarray:
    """The oracle: P(PNEUMONIA) minus its value with one cell painted the background grey, per cell."""
    def probability(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = preprocess(torch.from_numpy(images)[:, None], False)
            return task.probabilities(model(x))[:, 1].numpy()

    occluded = np.repeat(image[None], 16, axis=0)
    for k in range(16):
        row, col = divmod(k, 4)
        occluded[k, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = BACKGROUND
    return (probability(image[None]) - probability(occluded)).reshape(4, 4)


@pytest.mark.slow
def test_item14_frozen_model_grad_cam_peaks_where_occlusion_hurts_most(lesion_run):
    model, task, _ = load_classifier(lesion_run / "best.pt", torch.device("cpu"))
    rng = np.random.default_rng(1)
    cells = [(0, 0), (0, 3), (1, 1), (2, 2), (3, 0), (3, 3), (1, 2), (2, 1)]
    images = np.stack([lesion_image(rng, cell) for cell in cells])
    cams, _ = grad_cam(model, task, preprocess(torch.from_numpy(images)[:, None], False), target=1)
    for cell, image, cam in zip(cells, images, cams, strict=True):
        drops = occlusion_drops(model, task, image)
        occlusion_peak = np.unravel_index(drops.argmax(), drops.shape)
        # the 16 px cell holding the centre of the map's hottest unit
        cam_peak = [int((i + 0.5) * SIDE / side) // CELL for i, side in
                    zip(np.unravel_index(int(cam.argmax()), cam.shape), cam.shape, strict=True)]
        assert cam.std() > 0.1, f"lesion in {cell}: a flat map {cam.tolist()}"
        assert max(abs(a - b) for a, b in zip(cam_peak, occlusion_peak, strict=True)) <= 1, (
            f"lesion in {cell}: Grad-CAM peaks in {cam_peak}, occlusion in {occlusion_peak}")


@pytest.fixture(scope="module")
def real_frozen_run(shared_data, tmp_path_factory):
    """The README's offline recipe on real radiographs: a frozen random-init ResNet50 at 64 px."""
    overrides = ["data=chest_xray", f"data.root={shared_data / 'cxr-real'}", "model.weights=null",
                 "model.freeze_backbone=true", "data.image_size=64", "trainer.epochs=20", "trainer.bootstrap=0",
                 "trainer.device=cpu", "trainer.progress=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    out = tmp_path_factory.mktemp("real-frozen")
    return out, run(cfg, out, overrides=overrides), cfg


@pytest.mark.slow
def test_item14_real_radiographs_frozen_model_maps_are_not_blank(real_frozen_run):
    """Every PNEUMONIA test image the model calls so gets a map that varies over the image."""
    out, result, cfg = real_frozen_run
    test = load_dataset(cfg.data).test
    model, task, _ = load_classifier(out / "best.pt", torch.device("cpu"))
    called = [i for i, row in enumerate(read_rows(out / "test_predictions.csv"))
              if row["truth"] == row["label"] == "PNEUMONIA"]
    assert len(called) > 100
    cams, _ = grad_cam(model, task, preprocess(test.images[called], False), target=1)
    flat = [i for i, cam in zip(called, cams, strict=True) if cam.std() < 0.05]
    assert flat == [], f"{len(flat)} of {len(called)} maps are flat"


@pytest.mark.slow
def test_item14_tensorboard_gradcam_of_a_frozen_model_shows_heat(real_frozen_run):
    """The test/gradcam figure: a row of four NORMAL and a row of four PNEUMONIA test images. An
    overlay is red (jet's top) where its map peaks, and a blank map is jet's dark blue all over:
    each of the eight panels must hold red pixels."""
    out, _, _ = real_frozen_run
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    (figure,) = events.Images("test/gradcam")
    pixels = np.asarray(Image.open(io.BytesIO(figure.encoded_image_string)).convert("RGB")).astype(int)
    red = (pixels[..., 0] - pixels[..., 2] > 40) & (pixels[..., 1] < 120)
    rows, columns = np.array_split(np.arange(red.shape[0]), 2), np.array_split(np.arange(red.shape[1]), 4)
    heat = [[int(red[np.ix_(r, c)].sum()) for c in columns] for r in rows]
    assert min(min(row) for row in heat) > 50, f"red pixels per panel: {heat}"

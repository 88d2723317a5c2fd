"""The embedded generator's nih layout (ChestX-ray14 files, four co-occurring findings) on real files.

Also pins the Kaggle layout's bytes: caches made before the nih layout existed must still be found
complete and hold the same images.
"""

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr import synthetic
from cxr.config import SyntheticConfig
from cxr.synthetic import FINDINGS, ensure_synthetic, render_chest

SMALL = SyntheticConfig(train=40, val=8, test=20, min_size=64, max_size=96, layout="nih")
# enough images for the finding signs to be compared as groups; 64-96 px PNGs take about a second
LARGE = SyntheticConfig(train=392, val=8, test=100, min_size=64, max_size=96, seed=1, layout="nih")
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
# sha256 over (relative path, bytes) of every file of the Kaggle layout for KAGGLE_SPEC, computed when
# generator version 4 (an image per seed, drawn in parallel) was made. JPEG bytes depend on Pillow's
# libjpeg: after a Pillow upgrade recompute it on a commit known to be unchanged, rather than
# assume the generator drifted.
KAGGLE_SPEC = SyntheticConfig(train=20, val=4, test=8, min_size=64, max_size=96)
KAGGLE_SHA256 = "44ee6c159c939544d17712ad9786f975a80732f80b00e10c60f0796f6ecf594b"


def _rows(root: Path) -> list[dict]:
    with open(root / "Data_Entry_2017.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return [dict(zip(header, row, strict=True)) for row in reader]


def _lists(root: Path) -> dict[str, list[str]]:
    return {split: (root / f"{split}_list.txt").read_text().split()
            for split in ("train_val", "test")}


def _findings(row: dict) -> set[str]:
    return set() if row["Finding Labels"] == "No Finding" else set(row["Finding Labels"].split("|"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("nih") / "small", SMALL)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("nih") / "large", LARGE)


def test_csv_has_nih_header_and_eleven_cells_per_row(small):
    text = (small / "Data_Entry_2017.csv").read_text()
    assert text.splitlines()[0] == HEADER
    with open(small / "Data_Entry_2017.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][7:] == ["OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    assert {len(row) for row in table} == {11}
    rows = _rows(small)
    assert len(rows) == SMALL.train + SMALL.val + SMALL.test
    for row in rows:
        match = re.fullmatch(r"(\d{8})_(\d{3})\.png", row["Image Index"])
        assert match, row["Image Index"]
        assert int(row["Patient ID"]) == int(match[1]) and int(row["Follow-up #"]) == int(match[2])
        labels = row["Finding Labels"].split("|")
        # a fixed order, as NIH's: the labels are FINDINGS filtered, or exactly "No Finding"
        assert labels == ["No Finding"] or labels == [f for f in FINDINGS if f in labels]
        assert row["Patient Gender"] in ("M", "F") and row["View Position"] in ("PA", "AP")
        assert 0 < int(row["Patient Age"]) < 100 and float(row["OriginalImagePixelSpacing[x"]) > 0
    assert max(int(row["Follow-up #"]) for row in rows) >= 1  # several images per patient


def test_every_listed_image_is_a_grayscale_png_of_the_stated_size(small):
    for row in _rows(small):
        with Image.open(small / "images_001" / "images" / row["Image Index"]) as image:
            image.load()
            assert image.format == "PNG" and image.mode == "L"
            assert image.size == (int(row["OriginalImage[Width"]), int(row["Height]"]))
            assert SMALL.min_size <= image.height <= SMALL.max_size


def test_lists_are_patient_disjoint_and_cover_the_csv(small):
    lists = _lists(small)
    assert len(lists["train_val"]) == SMALL.train + SMALL.val and len(lists["test"]) == SMALL.test
    assert not set(lists["train_val"]) & set(lists["test"])
    assert set(lists["train_val"]) | set(lists["test"]) == {row["Image Index"] for row in _rows(small)}
    patients = {split: {name[:8] for name in names} for split, names in lists.items()}
    assert not patients["train_val"] & patients["test"]
    # test patients are spread over the ID range (as NIH's), not a block after train_val's
    assert min(patients["test"]) < max(patients["train_val"])


def test_each_finding_is_in_both_lists_with_co_occurrence_and_no_finding(small):
    rows = {row["Image Index"]: _findings(row) for row in _rows(small)}
    for names in _lists(small).values():
        for finding in FINDINGS:
            assert any(finding in rows[name] for name in names), finding
    assert any(len(found) >= 2 for found in rows.values())
    assert any(not found for found in rows.values())


def test_prevalences_and_correlation(large):
    found = [_findings(row) for row in _rows(large)]
    share = {f: np.mean([f in labels for labels in found]) for f in FINDINGS}
    assert 0.33 <= np.mean([not labels for labels in found]) <= 0.5
    for finding, expected in zip(FINDINGS, (0.2, 0.25, 0.2, 0.25), strict=True):
        assert abs(share[finding] - expected) < 0.07, (finding, share[finding])
    # Effusion goes with Pneumonia or Cardiomegaly
    with_cause = [labels for labels in found if labels & {"Pneumonia", "Cardiomegaly"}]
    without = [labels for labels in found if not labels & {"Pneumonia", "Cardiomegaly"}]
    assert np.mean(["Effusion" in labels for labels in with_cause]) > 2 * np.mean(
        ["Effusion" in labels for labels in without])


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over a k x k window (edge-padded), the same size as `a`."""
    p = np.pad(a, k // 2, mode="edge")
    return sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(k) for j in range(k)) / k ** 2


def _signs(a: np.ndarray) -> dict[str, float]:
    """One score per finding's sign on a 64 x 64 image in [0, 1] (rows and columns in pixels)."""
    spots = _box(a, 3) - _box(a, 11)  # small bright blobs stand out; ribs and haze much less
    lungs = np.concatenate([a[12:48, 8:27].ravel(), a[12:48, 37:56].ravel()])
    return {
        # the heart region right of the spine, against the whole image (exposure varies)
        "Cardiomegaly": a[34:50, 35:43].mean() - a.mean(),
        # either lung's bottom against its own top
        "Effusion": max(a[40:50, 10:24].mean() - a[16:28, 10:24].mean(),
                        a[40:50, 40:54].mean() - a[16:28, 40:54].mean()),
        "Nodule": max(spots[20:45, 14:27].max(), spots[20:45, 37:50].max()),
        # bright haze inside the lungs: the lung fields' upper decile against their median
        "Pneumonia": np.percentile(lungs, 90) - np.median(lungs),
    }


def _auroc(positive: list[float], negative: list[float]) -> float:
    """The share of (positive, negative) pairs ordered correctly."""
    return float(np.mean(np.asarray(positive)[:, None] > np.asarray(negative)[None, :]))


def test_each_finding_has_its_sign_in_the_files(large):
    """Images with a finding score higher on its sign than images without it (whatever else they
    have), and clearly higher than No Finding images; undrawn, a finding would score near 0.5."""
    scores, found = [], []
    for row in _rows(large):
        with Image.open(large / "images_001" / "images" / row["Image Index"]) as image:
            pixels = np.asarray(image.resize((64, 64), Image.BILINEAR), np.float32) / 255
        scores.append(_signs(pixels))
        found.append(_findings(row))
    for finding in FINDINGS:
        pos = [s[finding] for s, labels in zip(scores, found, strict=True) if finding in labels]
        rest = [s[finding] for s, labels in zip(scores, found, strict=True) if finding not in labels]
        clean = [s[finding] for s, labels in zip(scores, found, strict=True) if not labels]
        assert _auroc(pos, rest) > 0.75, finding
        assert _auroc(pos, clean) > 0.85, finding


def _added(seed: int, finding: str) -> np.ndarray:
    """What drawing `finding` adds to one 64 x 64 chest: the same streams with and without it."""
    def draw(findings):
        return render_chest(np.random.default_rng(seed), 64, 64, pneumonia="Pneumonia" in findings,
                            findings=findings, finding_rng=np.random.default_rng(seed + 100))
    return (draw((finding,)).astype(np.float32) - draw(()).astype(np.float32)).clip(0)


@pytest.mark.parametrize("finding, rows, cols", [
    ("Cardiomegaly", slice(28, 60), slice(20, 50)),  # the heart, about the midline
    ("Effusion", slice(32, 56), slice(None)),  # the lungs' lower halves
    ("Pneumonia", slice(10, 56), slice(6, 58)),  # the lung fields
])
def test_the_same_chest_with_a_finding_is_brighter_where_it_belongs(finding, rows, cols):
    for seed in range(8):
        added = _added(seed, finding)
        inside = np.zeros(added.shape, bool)
        inside[rows, cols] = True
        # exposure is rescaled about the image mean, so a little spills everywhere; the sign does not
        assert added[inside].mean() > 5 and added[inside].mean() > 5 * added[~inside].mean(), seed
        if finding == "Effusion":  # in one lung, not both
            left, right = added[40:56, :32].mean(), added[40:56, 32:].mean()
            assert max(left, right) > 3 * min(left, right), seed


def test_a_nodule_is_a_small_dense_spot():
    for seed in range(8):
        spot = _added(seed, "Nodule") > 40
        # one or two spots of radius 3-5% of 64 px (up to some 65 pixels), not a haze
        assert 4 <= spot.sum() <= 80, (seed, spot.sum())


def test_a_second_call_does_not_regenerate(small):
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["layout"] == "nih"
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*")}
    assert ensure_synthetic(small, SMALL) == small
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*")} == before


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        ensure_synthetic(tmp_path / "x", SyntheticConfig(train=2, val=1, test=1, layout="chexpert"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_the_kaggle_layout_is_unchanged_and_the_same_from_any_number_of_processes(tmp_path, monkeypatch):
    """Each image is drawn from its own seed: one process and two write the same bytes, and the
    bytes are those pinned for this generator version (a change that moves them must bump it)."""
    parallel = ensure_synthetic(tmp_path / "two", KAGGLE_SPEC)  # a process per core
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # as on a one-core machine: drawn in this process
    single = ensure_synthetic(tmp_path / "one", KAGGLE_SPEC)
    assert tree_digest(single) == tree_digest(parallel)
    assert tree_digest(parallel) == KAGGLE_SHA256
    assert json.loads((parallel / "manifest.json").read_text()) == {
        "generator_version": 4, "drawn": 192, "train": 20, "val": 4, "test": 8, "min_size": 64, "max_size": 96,
        "seed": 0}


def test_a_copy_drawn_at_another_size_is_drawn_again(tmp_path, monkeypatch):
    """DRAWN (the largest height an image is drawn at) changes the pixels: a cached copy drawn at
    another size is stale. It once changed without a version bump and old copies were read as new."""
    spec = SyntheticConfig(train=4, val=2, test=2, min_size=160, max_size=160, seed=3)
    root = ensure_synthetic(tmp_path / "copy", spec)
    before = tree_digest(root)
    monkeypatch.setattr(synthetic, "DRAWN", 96)
    assert tree_digest(ensure_synthetic(root, spec)) != before
    image = next((root / "train").rglob("*.jpeg"))
    assert Image.open(image).height == 160  # drawn at 96 px, stored at the size asked

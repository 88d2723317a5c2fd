"""The embedded dataset: deterministic chest-X-ray-like JPEGs in the Kaggle layout.

Each image is a frontal chest: a bright body, two dark lung fields, a bright spine and
mediastinum, ribs arcing across the lungs, film grain, and a random exposure. PNEUMONIA images add
hazy consolidations inside the lungs; some are faint, and NORMAL images carry small benign
densities too, so the task is learnable but not trivial. Sizes, aspect ratios, the 1:3 class ratio,
mostly-grayscale-some-RGB JPEGs and the file names (IM-XXXX, NORMAL2-IM-XXXX, personN_bacteria,
personN_virus, several images per patient) follow the real dataset, so the same loading path,
patient grouping and caching serve both.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.files import exclusive

GENERATOR_VERSION = 3
# share of NORMAL images per split, as in the real dataset (train 1341/5216, test 234/624)
NORMAL_SHARE = {"train": 0.26, "val": 0.5, "test": 0.375}


def _blob(yy, xx, cy, cx, ry, rx, angle=0.0):
    """Soft elliptical mask in [0, 1]."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return np.exp(-0.5 * (u * u + v * v) ** 2)


def render_chest(rng: np.random.Generator, height: int, width: int, pneumonia: bool) -> np.ndarray:
    """One grayscale chest image as uint8 (height, width)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    cx = 0.5 + rng.normal(0, 0.03)
    body = _blob(yy, xx, 0.6, cx, 0.55, 0.42 + rng.normal(0, 0.03))
    img = 0.15 + 0.55 * body
    lungs = np.zeros_like(img)
    lung_params = []
    for side in (-1, 1):
        ly = 0.5 + rng.normal(0, 0.03)
        lx = cx + side * (0.17 + rng.normal(0, 0.015))
        ry, rx = 0.27 + rng.normal(0, 0.02), 0.12 + rng.normal(0, 0.01)
        lungs = np.maximum(lungs, _blob(yy, xx, ly, lx, ry, rx, side * 0.12))
        lung_params.append((ly, lx, ry, rx))
    img -= 0.38 * lungs
    # ribs: bright arcs that cross both lung fields
    phase = rng.uniform(0, 2 * np.pi)
    ribs = np.sin((yy + 0.25 * (xx - cx) ** 2 * 4) * 2 * np.pi * rng.uniform(8, 11) + phase)
    img += 0.08 * np.clip(ribs, 0, 1) ** 3 * lungs
    # spine and mediastinum
    img += 0.3 * np.exp(-(((xx - cx) / 0.045) ** 2)) * (yy > 0.1)
    img += 0.2 * _blob(yy, xx, 0.62, cx + 0.03, 0.18, 0.09)
    # small benign densities in either class (vessels, nipples, markers)
    for _ in range(rng.integers(0, 4)):
        ly, lx, ry, rx = lung_params[rng.integers(2)]
        img += 0.12 * _blob(yy, xx, ly + rng.uniform(-ry, ry) * 0.7, lx + rng.uniform(-rx, rx) * 0.7,
                            0.02, 0.02)
    if pneumonia:
        severity = rng.uniform(0.7, 1.4)
        for _ in range(rng.integers(1, 4)):
            ly, lx, ry, rx = lung_params[rng.integers(2)]
            oy = ly + rng.uniform(-0.6, 0.8) * ry
            ox = lx + rng.uniform(-0.6, 0.6) * rx
            patch = _blob(yy, xx, oy, ox, rng.uniform(0.08, 0.2), rng.uniform(0.06, 0.12), rng.uniform(0, 3))
            img += 0.4 * severity * patch * lungs
    # exposure, contrast, film grain
    img = (img - img.mean()) * rng.uniform(0.8, 1.25) + img.mean() + rng.normal(0, 0.05)
    img += rng.normal(0, 0.035, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _file_names(rng: np.random.Generator, label: str, count: int, first_patient: int) -> list[str]:
    """Kaggle-style names, one to three images per patient."""
    names: list[str] = []
    patient = first_patient
    while len(names) < count:
        patient += 1
        for k in range(min(int(rng.integers(1, 4)), count - len(names))):
            if label == "NORMAL":
                prefix = "NORMAL2-IM" if patient % 2 else "IM"
                names.append(f"{prefix}-{patient:04d}-{k + 1:04d}.jpeg")
            else:
                kind = "bacteria" if rng.random() < 0.65 else "virus"
                names.append(f"person{patient}_{kind}_{patient * 3 + k}.jpeg")
    return names


def _manifest(spec) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "train": spec.train, "val": spec.val, "test": spec.test,
        "min_size": spec.min_size, "max_size": spec.max_size, "seed": spec.seed,
    }


def ensure_synthetic(root: str | os.PathLike, spec) -> Path:
    """Generate the dataset under `root` unless a complete copy with the same spec is there.

    Jobs started together on an empty cache (a joblib sweep, torchrun's ranks) take a lock: the
    first generates, the others wait and then find the copy complete. A complete copy is never
    replaced while anyone may read it; only a copy of another spec or generator version (or an
    interrupted one, which has no manifest) is, under the lock. The images are written into a
    temporary sibling folder and renamed into place, so nobody ever sees a half-written dataset.
    """
    root = Path(root)
    manifest = _manifest(spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(root.parent / f".{root.name}.lock"):
        if _manifest_of(root) == manifest:
            return root
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
        try:
            _generate(tmp, spec)
            (tmp / "manifest.json").write_text(json.dumps(manifest))
            if root.exists():  # another spec's or an interrupted copy, at this path
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _manifest_of(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _generate(folder: Path, spec) -> None:
    """Every split's images, with patients that never cross splits."""
    rng = np.random.default_rng(spec.seed)
    patient = 0
    for split in ("train", "val", "test"):
        total = getattr(spec, split)
        n_normal = round(total * NORMAL_SHARE[split])
        for label, count in (("NORMAL", n_normal), ("PNEUMONIA", total - n_normal)):
            (folder / split / label).mkdir(parents=True)
            names = _file_names(rng, label, count, patient)
            patient += len(names) + 1
            for name in names:
                _write_image(rng, folder / split / label / name, spec, label == "PNEUMONIA")


def _write_image(rng: np.random.Generator, path: Path, spec, pneumonia: bool) -> None:
    height = int(rng.integers(spec.min_size, spec.max_size + 1))
    width = int(height * rng.uniform(1.0, 1.45))
    # drawn at most 320 px high and upscaled: large files cost little to make
    scale = min(1.0, 320 / height)
    pixels = render_chest(rng, int(height * scale), int(width * scale), pneumonia=pneumonia)
    image = Image.fromarray(pixels, "L").resize((width, height), Image.BICUBIC)
    if rng.random() < 0.1:  # a few RGB files, as in the real dataset
        image = image.convert("RGB")
    image.save(path, quality=int(rng.integers(75, 96)))

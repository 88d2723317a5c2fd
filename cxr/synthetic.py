"""The embedded dataset: deterministic chest-X-ray-like images in the Kaggle or the NIH layout.

Each image is a frontal chest: a bright body, two dark lung fields, a bright spine and
mediastinum, ribs arcing across the lungs, film grain, and a random exposure. Small benign
densities appear in every image, so no finding is a matter of "anything bright in the lungs".

layout=kaggle (the default; binary): root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg. PNEUMONIA
images add hazy consolidations inside the lungs, some faint. Sizes, aspect ratios, the 1:3 class
ratio, mostly-grayscale-some-RGB JPEGs and the file names (IM-XXXX, NORMAL2-IM-XXXX,
personN_bacteria, personN_virus, several images per patient) follow the real dataset, so the same
loading path, patient grouping and caching serve both. Its bytes never change for a given spec
and generator version: cached copies are reused as they are.

Each image is drawn from its own seed, (spec.seed, its position), so the images are drawn over
every core (`draw_in_parallel`) and the files are the same whatever the number of processes; the
one sequential stream (spec.seed) draws only the names, labels and table rows.

layout=nih (multi-label): NIH ChestX-ray14's files: Data_Entry_2017.csv (its real header, 11
cells a row), train_val_list.txt and test_list.txt (patient-disjoint, as the official split), and
square grayscale PNGs named <patient:08d>_<follow-up:03d>.png under images_001/images/ (further
images_0NN/ as NIH's beyond 4,999 images). Four findings co-occur, each with its own sign:
Cardiomegaly (an enlarged, denser heart), Effusion (fluid in one lung's base under a meniscus),
Nodule (one or two small round dense spots) and Pneumonia (the consolidations above); about 43%
of images are No Finding.
"""

import csv
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.files import exclusive

GENERATOR_VERSION = 4  # 4: an image per seed, drawn in parallel, at most DRAWN px high
NIH_VERSION = 2
DRAWN = 192  # images are drawn at most this many px high and upscaled: large files cost little to make
CHUNK = 16  # images per task of a drawing process
LAYOUTS = ("kaggle", "nih")
# the nih layout's findings, in the order `Finding Labels` joins them
FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Pneumonia")
# Data_Entry_2017.csv's header as a csv reader sees it: the bracketed names hold a comma, so
# "OriginalImage[Width,Height]" is two cells, one above each of the rows' width and height
NIH_HEADER = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]")
# the real images_001/ holds 4,999 images and each later images_0NN/ 10,000
NIH_FOLDER_SIZES = (4999, 10000)
# share of NORMAL images per split, as in the real dataset (train 1341/5216, test 234/624)
NORMAL_SHARE = {"train": 0.26, "val": 0.5, "test": 0.375}


def _blob(yy, xx, cy, cx, ry, rx, angle=0.0):
    """Soft elliptical mask in [0, 1]."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return np.exp(-0.5 * (u * u + v * v) ** 2)


def render_chest(rng: np.random.Generator, height: int, width: int, pneumonia: bool,
                 findings: Collection[str] = (), finding_rng: np.random.Generator | None = None,
                 ) -> np.ndarray:
    """One grayscale chest image as uint8 (height, width).

    `findings` adds the signs of Cardiomegaly, Effusion and Nodule (Pneumonia is `pneumonia`).
    Their shapes, and the consolidations', are drawn from `finding_rng` when given, so that the
    anatomy, exposure and grain (drawn from `rng`) do not depend on which findings an image has.
    With the defaults the draws are exactly those of the Kaggle layout, whose files must stay
    byte-identical for existing caches.
    """
    frng = rng if finding_rng is None else finding_rng
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
        severity = frng.uniform(0.7, 1.4)
        for _ in range(frng.integers(1, 4)):
            ly, lx, ry, rx = lung_params[frng.integers(2)]
            oy = ly + frng.uniform(-0.6, 0.8) * ry
            ox = lx + frng.uniform(-0.6, 0.6) * rx
            patch = _blob(yy, xx, oy, ox, frng.uniform(0.08, 0.2), frng.uniform(0.06, 0.12), frng.uniform(0, 3))
            img += 0.4 * severity * patch * lungs
    if findings:  # nothing drawn otherwise: the Kaggle path's draws stay as they were
        img += _finding_signs(frng, yy, xx, cx, lung_params, findings, width / height)
    # exposure, contrast, film grain
    img = (img - img.mean()) * rng.uniform(0.8, 1.25) + img.mean() + rng.normal(0, 0.05)
    img += rng.normal(0, 0.035, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _finding_signs(rng: np.random.Generator, yy, xx, cx: float, lung_params: list, findings,
                   aspect: float) -> np.ndarray:
    """What Cardiomegaly, Effusion and Nodule add to the image, before exposure and grain."""
    add = np.zeros_like(yy)
    if "Cardiomegaly" in findings:
        # the heart shadow widens well past the mediastinum into both lungs' medial thirds (a
        # cardiothoracic ratio over 0.5) and, thicker, is denser than the normal one drawn above
        grow = rng.uniform(1.5, 1.9)
        add += rng.uniform(0.2, 0.28) * _blob(yy, xx, 0.64, cx + 0.05, 0.19 * grow ** 0.5, 0.09 * grow)
    if "Effusion" in findings:
        # fluid settles in the bottom of one pleural space: opaque below a flat top that curves up
        # along the lateral chest wall (the meniscus), blunting the costophrenic angle
        side = int(rng.integers(2))
        ly, lx, ry, rx = lung_params[side]
        lung = _blob(yy, xx, ly, lx, ry, rx, (2 * side - 1) * 0.12)
        lateral = np.clip((xx - lx) * (2 * side - 1) / rx, 0, 1)
        top = ly + ry * rng.uniform(0.05, 0.45) - 0.1 * ry * lateral ** 2
        fluid = 1 / (1 + np.exp(-(yy - top) / 0.012))
        add += rng.uniform(0.38, 0.48) * fluid * lung
    if "Nodule" in findings:
        # one or two round, sharp-edged dense spots; the radius (3-5% of the width) keeps them a
        # few pixels wide at 64 px, and they are denser and larger than the benign densities
        for _ in range(rng.integers(1, 3)):
            ly, lx, ry, rx = lung_params[rng.integers(2)]
            radius = rng.uniform(0.03, 0.05)
            add += rng.uniform(0.3, 0.4) * _blob(yy, xx, ly + rng.uniform(-0.6, 0.6) * ry,
                                                 lx + rng.uniform(-0.5, 0.5) * rx, radius * aspect, radius)
    return add


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


def _layout(spec) -> str:
    layout = getattr(spec, "layout", "kaggle")  # specs written before the nih layout have none
    if layout not in LAYOUTS:
        raise ValueError(f"data.synthetic.layout must be one of {'|'.join(LAYOUTS)}, got {layout!r}")
    return layout


def _manifest(spec) -> dict:
    manifest = {
        "generator_version": GENERATOR_VERSION, "drawn": DRAWN,
        "train": spec.train, "val": spec.val, "test": spec.test,
        "min_size": spec.min_size, "max_size": spec.max_size, "seed": spec.seed,
    }
    # DRAWN changes the pixels of both layouts: a copy drawn at another size is stale; the nih
    # layout has its own version, so changing it never invalidates the Kaggle copies
    if _layout(spec) == "nih":
        manifest |= {"layout": "nih", "layout_version": NIH_VERSION}
    return manifest


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
            (_generate_nih if _layout(spec) == "nih" else _generate)(tmp, spec)
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


def draw_in_parallel(draw: Callable[..., object], tasks: list[tuple], workers: int | None = None) -> None:
    """`draw(*task)` for every task, over `workers` processes (default: every core), CHUNK tasks at
    a time; a child's error is raised here."""
    chunks = [tasks[start:start + CHUNK] for start in range(0, len(tasks), CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    if workers <= 1:
        for chunk in chunks:
            _draw_chunk(draw, chunk)
        return
    # fork: the children run NumPy and PIL only, and start in milliseconds
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for done in [pool.submit(_draw_chunk, draw, chunk) for chunk in chunks]:
            done.result()


def _draw_chunk(draw: Callable[..., object], chunk: list[tuple]) -> None:
    for task in chunk:
        draw(*task)


def _generate(folder: Path, spec) -> None:
    """Every split's images, with patients that never cross splits."""
    rng = np.random.default_rng(spec.seed)
    patient, tasks = 0, []
    for split in ("train", "val", "test"):
        total = getattr(spec, split)
        n_normal = round(total * NORMAL_SHARE[split])
        for label, count in (("NORMAL", n_normal), ("PNEUMONIA", total - n_normal)):
            (folder / split / label).mkdir(parents=True)
            names = _file_names(rng, label, count, patient)
            patient += len(names) + 1
            tasks += [(folder / split / label / name, (spec.seed, len(tasks) + k), spec.min_size, spec.max_size,
                       label == "PNEUMONIA") for k, name in enumerate(names)]
    draw_in_parallel(_write_image, tasks)


def _write_image(path: Path, seed: tuple[int, int], min_size: int, max_size: int, pneumonia: bool) -> None:
    rng = np.random.default_rng(seed)
    height = int(rng.integers(min_size, max_size + 1))
    width = int(height * rng.uniform(1.0, 1.45))
    scale = min(1.0, DRAWN / height)
    pixels = render_chest(rng, int(height * scale), int(width * scale), pneumonia=pneumonia)
    image = Image.fromarray(pixels, "L").resize((width, height), Image.BICUBIC)
    if rng.random() < 0.1:  # a few RGB files, as in the real dataset
        image = image.convert("RGB")
    image.save(path, quality=int(rng.integers(75, 96)))


def _nih_images(rng: np.random.Generator, spec) -> list[dict]:
    """Who is imaged when, and in which list: patients never cross train_val and test.

    Each list's patients get one to four follow-ups, the last patient cut short to hit the exact
    count; Patient IDs are then shuffled across both lists, as NIH's test patients are spread over
    the whole ID range rather than forming a block at its end.
    """
    patients = []
    for split, count in (("train_val", spec.train + spec.val), ("test", spec.test)):
        done = 0
        while done < count:
            n = min(int(rng.integers(1, 5)), count - done)
            patients.append((split, n))
            done += n
    images = []
    for (split, n), pid in zip(patients, rng.permutation(len(patients)) + 1, strict=True):
        age, gender = int(rng.integers(5, 90)), "M" if rng.random() < 0.56 else "F"
        for k in range(n):
            images.append({"index": f"{pid:08d}_{k:03d}.png", "split": split, "patient": int(pid),
                           "follow_up": k, "age": age + k // 3, "gender": gender})
    images.sort(key=lambda image: image["index"])
    for image in images:
        image["findings"] = _draw_findings(rng)
    for split in ("train_val", "test"):
        members = [image for image in images if image["split"] == split]
        for finding in FINDINGS:  # so that every finding has positives (and an AUROC) in each list
            if members and not any(finding in image["findings"] for image in members):
                chosen = members[int(rng.integers(len(members)))]
                chosen["findings"] = [f for f in FINDINGS if f in chosen["findings"] or f == finding]
    return images


def _draw_findings(rng: np.random.Generator) -> list[str]:
    """One image's findings, in FINDINGS order; empty means No Finding (about 43% of images).

    Prevalences near Cardiomegaly 0.2, Effusion 0.26, Nodule 0.2, Pneumonia 0.25. Effusion follows
    heart failure and pneumonia, as in real chest films: 0.5 with either, 0.1 without.
    """
    cardiomegaly = rng.random() < 0.2
    pneumonia = rng.random() < 0.25
    nodule = rng.random() < 0.2
    effusion = rng.random() < (0.5 if cardiomegaly or pneumonia else 0.1)
    present = (cardiomegaly, effusion, nodule, pneumonia)
    return [finding for finding, on in zip(FINDINGS, present, strict=True) if on]


def _nih_folder(position: int) -> str:
    """images_0NN/images for the image at this position in Image Index order, as NIH splits them."""
    first, later = NIH_FOLDER_SIZES
    number = 1 if position < first else 2 + (position - first) // later
    return f"images_{number:03d}/images"


def _generate_nih(folder: Path, spec) -> None:
    """Data_Entry_2017.csv, train_val_list.txt, test_list.txt and the PNGs under images_0NN/."""
    rng = np.random.default_rng(spec.seed)
    images = _nih_images(rng, spec)
    rows, tasks = [], []
    for position, image in enumerate(images):
        path = folder / _nih_folder(position) / image["index"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tasks.append((path, (spec.seed, position), spec.min_size, spec.max_size, image["findings"]))
        side = _nih_side(*tasks[-1][1:4])
        view = "AP" if rng.random() < 0.4 else "PA"
        spacing = ("0.143", "0.139", "0.168")[int(rng.integers(3))]
        rows.append([image["index"], "|".join(image["findings"]) or "No Finding", image["follow_up"],
                     image["patient"], image["age"], image["gender"], view, side, side, spacing, spacing])
    draw_in_parallel(_write_nih_image, tasks)
    with open(folder / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    for split in ("train_val", "test"):
        names = [image["index"] for image in images if image["split"] == split]
        (folder / f"{split}_list.txt").write_text("".join(name + "\n" for name in names))


def _nih_side(seed: tuple[int, int], min_size: int, max_size: int) -> int:
    """An NIH image's side: the first draw of its own seed."""
    return int(np.random.default_rng(seed).integers(min_size, max_size + 1))


def _write_nih_image(path: Path, seed: tuple[int, int], min_size: int, max_size: int, findings: list[str]) -> None:
    """A square grayscale PNG, like NIH's (theirs are all 1024 px; ours keep the spec's sizes)."""
    rng = np.random.default_rng(seed)
    side = int(rng.integers(min_size, max_size + 1))  # as _nih_side drew it for the table
    # the findings' shapes come from their own stream, so an image's anatomy, exposure and grain
    # do not depend on its labels (and the tests can draw one chest with and without a finding)
    finding_rng = np.random.default_rng(int(rng.integers(2 ** 63)))
    small = int(side * min(1.0, DRAWN / side))  # drawn at most DRAWN px and upscaled, as above
    pixels = render_chest(rng, small, small, pneumonia="Pneumonia" in findings, findings=findings,
                          finding_rng=finding_rng)
    Image.fromarray(pixels, "L").resize((side, side), Image.BICUBIC).save(path)

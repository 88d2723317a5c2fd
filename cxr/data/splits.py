"""Who each image belongs to, and splits that keep a patient on one side.

Validation (and, for a table without a split column, test) is carved by patient, so that
near-duplicate views of one patient never sit on both sides; `patient_id` is the one place that
decides who an image belongs to. `subset` cuts a split down for quick checks (data.limit).

With data.patient_source=dicom the patient is each DICOM header's PatientID, kept only as a salted
hash (HMAC-SHA256): patients are grouped by it, and nothing that could ever be written (a split,
a log line, result.json) holds the ID itself. The salt is a secret of the cache dir
(<data.cache_dir>/patient-salt, 32 random bytes made on first use, readable by its owner alone),
not a value derived from the config: IDs are often short numbers, and a hash salted with
something written in .hydra/config.yaml (data.split_seed) could be reversed by trying every
number. The cache dir already holds the decoded images of the dataset, so it is no less private
than the salt. Sweep jobs and later runs on one cache dir share the salt, so their splits agree;
elsewhere copy the salt file to carve the same splits.
"""

import hashlib
import hmac
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sklearn.model_selection import StratifiedShuffleSplit

from cxr.data.errors import DataError
from cxr.files import atomic_write, exclusive
from cxr.task import Task

log = logging.getLogger(__name__)

# How a patient was told, as result.json's data.patients says it: "column <name>" (a table's
# patient column), CheXpert's patient folder, a Kaggle file name, or none (the image alone)
COLUMN, CHEXPERT_PATH, FILE_NAME, PER_IMAGE = "column", "CheXpert path", "file name pattern", "per image"
DICOM_HEADER = "DICOM PatientID (salted hash)"
# data.patient_source: the layout's own rule (above), or each DICOM header's PatientID
PATIENT_SOURCES = ("layout", "dicom")
SALT_FILE = "patient-salt"
# Kaggle's file names: IM-0001-0001.jpeg, NORMAL2-IM-1427-0001.jpeg, person12_bacteria_45.jpeg
FILE_NAME_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE),
)
# CheXpert's paths: CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")


def patient_id(path: str, rule: str = FILE_NAME, cell: str = "") -> tuple[str, str]:
    """Who an image belongs to, and how that was told, by its layout's `rule`:

    "column <name>"  the table's patient cell (`cell`); an empty one is an error
    CHEXPERT_PATH    the patientNNNNN folder in the path as the table lists it; none is an error
                     (a guess would merge every patient's view1_frontal.jpg into one)
    FILE_NAME        a Kaggle file name (IM-0001-0001.jpeg -> IM-0001, person12_bacteria_45.jpeg ->
                     PERSON12); else PER_IMAGE: the image alone, named by its path (two files of one
                     name in two folders are two patients)
    DICOM_HEADER     `cell`: the salted hash of the file's PatientID (`dicom_patient`); else (no
                     PatientID, or no readable DICOM header) PER_IMAGE

    Errors are ValueErrors, given a line by the table's reader.
    """
    if rule.startswith(COLUMN):
        if not cell:
            raise ValueError(f"empty patient cell in {rule}")
        return cell, rule
    if rule == CHEXPERT_PATH:
        match = CHEXPERT_PATIENT.search(path)
        if not match:
            raise ValueError(f"no patient folder (patientNNNNN) in path {path!r}; CheXpert lists each image "
                             "under its patient's folder")
        return match.group(1), rule
    if rule == DICOM_HEADER:
        return (cell, rule) if cell else (path, PER_IMAGE)
    name = Path(path).name
    for pattern in FILE_NAME_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1).upper(), FILE_NAME
    return path, PER_IMAGE


class Patients:
    """Who each image belongs to, told by `patient_id` under one layout's rule, and how many images
    were told each way (result.json's data.patients: `source`)."""

    def __init__(self, rule: str = FILE_NAME, salt: bytes = b""):
        self.rule, self.salt, self.of, self.told = rule, salt, {}, Counter()

    def add(self, image: str, listed: str | None = None, cell: str = "") -> None:
        """`image`'s patient, from its path as a table lists it (`listed`; default: `image`) and the
        table's patient cell (DICOM_HEADER: the file's hashed PatientID instead)."""
        if self.rule == DICOM_HEADER:
            cell = dicom_patient(image, self.salt)
        patient, how = patient_id(listed or image, self.rule, cell)
        self.of[image] = patient
        self.told[how] += 1

    @property
    def per_image(self) -> int:
        """Images that are their own patient (no column, and a file name no pattern knows)."""
        return self.told[PER_IMAGE]

    @property
    def source(self) -> str:
        total = sum(self.told.values())
        if 0 < self.per_image < total:
            return f"{self.rule}, {PER_IMAGE} for {self.per_image} of {total} images"
        return PER_IMAGE if self.per_image else self.rule

    def warn_if_per_image(self) -> None:
        """Said once, before carving a split: images of one patient may then land on both sides."""
        if self.per_image and self.rule == DICOM_HEADER:
            log.warning("patients: %d of %d images have no PatientID in a readable DICOM header, so each is its "
                        "own patient (data.patient_source=dicom)", self.per_image, sum(self.told.values()))
        elif self.per_image:
            log.warning("patients: %d of %d images have no patient column and a file name no pattern knows "
                        "(IM-XXXX, personN_bacteria/virus), so each is its own patient: views of one patient can "
                        "land in both train and validation or test (data=csv with data.patient_column names "
                        "them)", self.per_image, sum(self.told.values()))


def layout_patients(data_cfg, rule: str = FILE_NAME) -> Patients:
    """A layout's patients: by its own `rule`, or by DICOM header (data.patient_source=dicom)."""
    if data_cfg.patient_source == "dicom":
        return Patients(DICOM_HEADER, patient_salt(Path(data_cfg.cache_dir).expanduser()))
    return Patients(rule)


def dicom_patient(path: str, salt: bytes) -> str:
    """The salted hash (HMAC-SHA256, 16 hex digits) of the file's PatientID; "" when it has none or
    is not a readable DICOM file. PatientID is the one element parsed; only its hash is returned."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
        return ""
    patient = str(header.get("PatientID") or "").strip()
    return hmac.new(salt, patient.encode(), hashlib.sha256).hexdigest()[:16] if patient else ""


def patient_salt(cache_dir: Path) -> bytes:
    """The cache dir's secret salt (see the module's docstring): 32 random bytes, made on first use."""
    path = cache_dir / SALT_FILE

    def write_salt(file) -> None:
        os.fchmod(file.fileno(), 0o600)  # before the salt is in it
        file.write(os.urandom(32))

    with exclusive(cache_dir / f".{SALT_FILE}.lock"):  # sweep jobs started together: one salt
        if not path.exists():
            atomic_write(path, write_salt)
        return path.read_bytes()


def split_by_patient(items: list[tuple[str, int]], fraction: float, seed: int,
                     patient_of: Callable[[str], str], task: Task):
    """Carve `fraction` of the images out of train as validation, per class, no patient on both sides.

    Patients are shuffled (by `seed`) within their class (the label of most of their images) and
    moved to validation while that brings the class's validation count closer to its share, so
    any fraction is met within about one patient's images per class. (scikit-learn's
    StratifiedGroupKFold gives only 1/k fractions: 0.15 became 14.3%, 0.4 became 50%.)
    Multi-label items have no one class: their patients form a single stratum (`Task.stratum`).
    """
    labels = np.array([task.stratum(label) for _, label in items], dtype=np.int64)
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, (path, _) in enumerate(items):
        by_patient[patient_of(path)].append(index)
    patients = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(patients))
    val: list[int] = []
    for label in np.unique(labels):
        target, taken = fraction * np.sum(labels == label), 0
        for k in order:
            members = by_patient[patients[k]]
            if np.bincount(labels[members]).argmax() != label:
                continue
            # take a patient while that moves the count toward the target (at least one patient)
            if abs(taken + len(members) - target) < abs(taken - target) or taken == 0:
                val += members
                taken += len(members)
    chosen = set(val)
    return ([item for i, item in enumerate(items) if i not in chosen],
            [item for i, item in enumerate(items) if i in chosen])


def subset(items: list[tuple[str, int]], limit: int | None, seed: int, task: Task) -> list[tuple[str, int]]:
    """A stratified, deterministic subset of at most `limit` items (for quick checks)."""
    if limit is None or len(items) <= limit:
        return items
    if task.multilabel:  # no class to stratify by: a seeded sample
        pick = np.random.default_rng(seed).choice(len(items), limit, replace=False)
        return [items[i] for i in sorted(pick)]
    labels = [label for _, label in items]
    if limit < len(set(labels)):
        raise DataError(f"data.limit={limit} is smaller than the number of classes ({len(set(labels))})")
    # too few of a class to stratify, or fewer left out than classes (scikit-learn refuses both,
    # e.g. 66 images of 3 classes cut to 64): take an even spread of the label-sorted items
    if min(np.bincount(labels)) < 2 or len(items) - limit < len(set(labels)):
        return [items[i] for i in np.linspace(0, len(items) - 1, limit).astype(int)]
    pick, _ = next(StratifiedShuffleSplit(1, train_size=limit, random_state=seed).split(items, labels))
    return [items[i] for i in sorted(pick)]

"""Who each image belongs to, and splits that keep a patient on one side.

Validation (and, for a table without a split column, test) is carved by patient, so that
near-duplicate views of one patient never sit on both sides; `patient_id` is the one place that
decides who an image belongs to. `subset` cuts a split down for quick checks (data.limit).
"""

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

from cxr.data.errors import DataError

# Kaggle's file names: IM-0001-0001.jpeg, NORMAL2-IM-1427-0001.jpeg, person12_bacteria_45.jpeg
FILE_NAME_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE),
)
# CheXpert's paths: CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


def patient_id(path: str, cell: str = "", chexpert: bool = False) -> str:
    """The patient an image belongs to: the table's patient cell when it has one; CheXpert's
    patientNNNNN folder in the path as the table lists it; a Kaggle file name (IM-0001-0001.jpeg ->
    IM-0001, person12_bacteria_45.jpeg -> PERSON12); else the file stem."""
    if cell:
        return cell
    if chexpert:
        match = CHEXPERT_PATIENT.search(path)
        if match:
            return match.group(1)
    name = Path(path).name
    for pattern in FILE_NAME_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1).upper()
    return Path(path).stem


def split_by_patient(items: list[tuple[str, int]], fraction: float, seed: int,
                     patient_of: Callable[[str], str] = patient_id):
    """Carve `fraction` of the images out of train as validation, per class, no patient on both sides.

    Patients are shuffled (by `seed`) within their class (the label of most of their images) and
    moved to validation while that brings the class's validation count closer to its share, so
    any fraction is met within about one patient's images per class. (scikit-learn's
    StratifiedGroupKFold gives only 1/k fractions: 0.15 became 14.3%, 0.4 became 50%.)
    Multi-label items have no one class: their patients form a single stratum.
    """
    labels = np.array([label for _, label in items])
    if labels.ndim == 2:  # multi-label: one stratum, the patients in random order
        labels = np.zeros(len(items), dtype=np.int64)
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


def subset(items: list[tuple[str, int]], limit: int | None, seed: int) -> list[tuple[str, int]]:
    """A stratified, deterministic subset of at most `limit` items (for quick checks)."""
    if limit is None or len(items) <= limit:
        return items
    if isinstance(items[0][1], tuple):  # multi-label: no class to stratify by, a seeded sample
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

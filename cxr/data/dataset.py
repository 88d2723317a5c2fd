"""What `run()` gets from the data config: the classes and three decoded splits (`Dataset`).

`load_dataset` lists the layout (cxr.data.layouts), carves validation from train by patient
(cxr.data.splits) when the layout gives none, and has cxr.decoding decode every split once
into a cached uint8 array; cxr.batches then serves batches of it on the training device.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cxr.data.errors import DataError
from cxr.data.layouts import LAYOUTS, SPLITS, Listing
from cxr.data.splits import split_by_patient, subset
from cxr.decoding import Split, load_split
from cxr.task import UNKNOWN, Task

log = logging.getLogger(__name__)

@dataclass
class Dataset:
    root: Path
    task: Task  # binary, multi-class or multi-label; its classes (or findings) in output order
    train: Split
    val: Split
    test: Split
    patients: str  # how each image's patient was told (cxr.data.splits.Patients.source)

    @property
    def classes(self) -> list[str]:
        return list(self.task.classes)

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + self.val.skipped + self.test.skipped

    def index(self) -> dict[str, dict]:
        """Per split, its image count and a sha256 of its files (paths relative to `root`, so a
        moved dataset folder still matches), labels and skipped files: what a resumed run checks
        it trains and tests on (cxr.checkpoint)."""
        index = {}
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            listing = [[os.path.relpath(path, self.root) for path in split.paths], split.labels.tolist(),
                       sorted(os.path.relpath(path, self.root) for path in split.skipped)]
            digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
            index[name] = {"images": len(split), "sha256": digest}
        return index


def label_counts(split: Split, findings: list[str]) -> dict[str, dict[str, int]]:
    """A multi-label split's positive, negative and unknown labels per finding (what
    data.uncertain and data.blank change)."""
    labels = split.labels
    return {name: {"positive": int((labels[:, k] == 1).sum()), "negative": int((labels[:, k] == 0).sum()),
                   "unknown": int((labels[:, k] == UNKNOWN).sum())} for k, name in enumerate(findings)}


def check_train_labels(listing: Listing, train: Split) -> None:
    """Multi-label: log the training labels per finding; single-label: every class can be learnt."""
    if listing.task.multilabel:
        counts = label_counts(train, listing.classes)
        log.info("train labels per finding (positive/negative/unknown): %s", ", ".join(
            f"{name} {c['positive']}/{c['negative']}/{c['unknown']}" for name, c in counts.items()))
        absent = [name for name, c in counts.items() if not c["positive"]]
        if absent:  # it can still be scored where other splits have it; its AUROC is null otherwise
            log.warning("no positive training image of %s", ", ".join(absent))
    else:  # a class of unreadable files only would leave one class to train on, and no error
        for label, name in enumerate(listing.classes):
            if not (train.labels == label).any():
                raise DataError(f"no readable images in {listing.where('train', name)}")


def load_dataset(data_cfg) -> Dataset:
    """Everything `run()` needs from the data config: classes and three decoded splits."""
    listing = LAYOUTS[data_cfg.layout](data_cfg)
    items = dict(listing.items)
    if not items["val"]:  # the layout's own validation: none, or set aside (the folders' val/)
        listing.patients.warn_if_per_image()  # here, so once: a table's test is carved only when val is too
        items["train"], items["val"] = split_by_patient(items["train"], data_cfg.val_fraction,
                                                        data_cfg.split_seed, listing.patient_of, listing.task)
    cache_dir = Path(data_cfg.cache_dir).expanduser() / "decoded"
    splits = {}
    for name in SPLITS:
        chosen = subset(items[name], data_cfg.limit, data_cfg.split_seed, listing.task)
        splits[name] = load_split(chosen, data_cfg.image_size, cache_dir, data_cfg.decode_workers, name)
        if len(splits[name]) == 0:
            raise DataError(f"no readable images in {listing.where(name)}")
    check_train_labels(listing, splits["train"])
    dataset = Dataset(listing.root, listing.task, **splits, patients=listing.patients.source)
    if dataset.skipped:
        log.warning("skipped %d unreadable file(s): %s", len(dataset.skipped), ", ".join(dataset.skipped))
    return dataset

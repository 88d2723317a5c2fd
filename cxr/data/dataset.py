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
from cxr.pixels import DecoderMissing
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
    def skipped(self) -> dict[str, str]:
        """Every split's unreadable files, each with the reason it was skipped."""
        return {**self.train.skipped, **self.val.skipped, **self.test.skipped}

    def index(self) -> dict[str, dict]:
        """Per split, its image count and a sha256 of its files, labels and skipped files: what a
        resumed run checks it trains and tests on (cxr.checkpoint). Paths are taken relative to the
        folder all the images share, so a moved dataset folder still matches, and so does a moved
        table whose paths are absolute."""
        splits = [getattr(self, name) for name in ("train", "val", "test")]
        common = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for split in splits
                                     for path in [*split.paths, *split.skipped]])
        index = {}
        for name, split in zip(("train", "val", "test"), splits, strict=True):
            listing = [[os.path.relpath(path, common) for path in split.paths], split.labels.tolist(),
                       sorted(os.path.relpath(path, common) for path in split.skipped)]
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


def first_reason(skipped: dict[str, str]) -> str:
    """The first skipped file and why, for a one-line error about a split that has no image left."""
    if not skipped:
        return ""
    path, reason = next(iter(skipped.items()))
    return f" ({len(skipped)} skipped; {path}: {reason})"


def carved(data_cfg, listing: Listing) -> dict[str, list]:
    """The layout's items per split, validation carved from train by patient where it gives none."""
    items = dict(listing.items)
    if not items["val"]:  # the layout's own validation: none, or set aside (the folders' val/)
        listing.patients.warn_if_per_image()  # here, so once: a table's test is carved only when val is too
        items["train"], items["val"] = split_by_patient(items["train"], data_cfg.val_fraction,
                                                        data_cfg.split_seed, listing.patient_of, listing.task)
    return items


def decoded(data_cfg, listing: Listing, name: str, items: list) -> Split:
    """One split's items (cut to data.limit) decoded through the cache; DataError when none is readable."""
    chosen = subset(items, data_cfg.limit, data_cfg.split_seed, listing.task)
    cache_dir = Path(data_cfg.cache_dir).expanduser() / "decoded"
    try:
        split = load_split(chosen, data_cfg.image_size, cache_dir, data_cfg.decode_workers, name, data_cfg.window)
    except DecoderMissing as error:  # every file of such an export is compressed alike: not a skip
        raise DataError(str(error)) from None
    if len(split) == 0:
        raise DataError(f"no readable images in {listing.where(name)}{first_reason(split.skipped)}")
    return split


def warn_skipped(skipped: dict[str, str]) -> None:
    if skipped:
        log.warning("skipped %d unreadable file(s): %s", len(skipped),
                    ", ".join(f"{path} ({reason})" for path, reason in skipped.items()))


def load_dataset(data_cfg) -> Dataset:
    """Everything `run()` needs from the data config: classes and three decoded splits."""
    listing = LAYOUTS[data_cfg.layout](data_cfg)
    items = carved(data_cfg, listing)
    splits = {name: decoded(data_cfg, listing, name, items[name]) for name in SPLITS}
    check_train_labels(listing, splits["train"])
    dataset = Dataset(listing.root, listing.task, **splits, patients=listing.patients.source)
    warn_skipped(dataset.skipped)
    return dataset


@dataclass
class Target:
    """The data a trained model is evaluated on (cxr.evaluate): its task and the decoded splits asked for."""

    root: Path
    task: Task
    splits: dict[str, Split]
    patients: str

    @property
    def skipped(self) -> dict[str, str]:
        return {path: reason for split in self.splits.values() for path, reason in split.skipped.items()}


def load_target(data_cfg, names: tuple[str, ...]) -> Target:
    """The splits `names` of the data config, decoded as `load_dataset` decodes them (the same
    cache entries where the split is the same). The test split alone needs no validation carved
    (it does not depend on it); every split is listed as training lists it, validation carved."""
    listing = LAYOUTS[data_cfg.layout](data_cfg)
    items = listing.items if names == ("test",) else carved(data_cfg, listing)
    target = Target(listing.root, listing.task, {name: decoded(data_cfg, listing, name, items[name]) for name in names},
                    listing.patients.source)
    warn_skipped(target.skipped)
    return target

"""Find the images (class folders or a CSV), split them by patient, decode them -> `Dataset`.

Each layout becomes a `Listing`: the classes (or, for multi-label data, the findings) and the
(path, label) items of each split. Validation is carved from train by patient; cxr.decoding then
decodes every split once into a cached uint8 array, and cxr.batches serves batches of it on the
training device.
"""

import csv
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

from cxr.decoding import Split, load_split
from cxr.synthetic import ensure_synthetic
from cxr.task import UNKNOWN, Task

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)", re.IGNORECASE),
)


class DataError(Exception):
    """Unusable dataset (missing folder, no images, one class): reported as one line."""


@dataclass
class Dataset:
    root: Path
    classes: list[str]  # the class names, or (multilabel) the findings, in output order
    train: Split
    val: Split
    test: Split

    @property
    def task(self) -> Task:
        """Binary, multi-class or (labels (N, K) in {1, 0, UNKNOWN}) multi-label."""
        return Task.of_labels(self.classes, self.train.labels)

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + self.val.skipped + self.test.skipped


# ---------------------------------------------------------------------------------------------
# Finding files


def resolve_root(root: str | os.PathLike) -> Path:
    """The folder that holds train/ and test/: root itself or the zip's chest_xray/ inside it.

    The Kaggle zip unpacks to chest_xray/{train,val,test} plus a nested duplicate
    chest_xray/chest_xray/ and __MACOSX/; the first folder with a train/ wins, so the duplicate is
    never read and no image is counted twice.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root does not exist or is not a folder: {root}")
    for candidate in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        if (candidate / "train").is_dir():
            return candidate
    raise DataError(f"no train/ folder in data.root {root} (expected root/{{train,val,test}}/<class>/)")


def is_visible(path: Path) -> bool:
    # macOS leaves .DS_Store, ._* resource forks and __MACOSX/ behind: never data
    return not path.name.startswith(".") and path.name != "__MACOSX"


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"missing split folder: {split_dir}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and is_visible(p))
    if len(classes) < 2:
        raise DataError(f"need at least two class folders in {split_dir}, found {classes or 'none'}")
    return classes


def list_files(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every visible file in split_dir/<class>/, sorted for determinism."""
    items = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            raise DataError(f"missing class folder: {folder}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_visible(p))
        if not files:
            raise DataError(f"no images in class folder: {folder}")
        items += [(str(p), label) for p in files]
    return items


def patient_id(path: str) -> str:
    """IM-0001-0001.jpeg -> IM-0001; person12_bacteria_45.jpeg -> person12; else the file stem."""
    name = Path(path).name
    for pattern in PATIENT_PATTERNS:
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


@dataclass
class Listing:
    """A layout read but not decoded: class order, (path, label) items per split, and who is whom.

    `items["val"]` is empty unless the layout's own validation split is used (val_split=official).
    """

    root: Path
    classes: list[str]
    items: dict[str, list[tuple[str, int]]]
    patient_of: Callable[[str], str] = patient_id
    csv: Path | None = None  # the CSV the items came from (None: class folders)

    @property
    def multilabel(self) -> bool:
        """Labels are tuples, one value per finding in `classes`."""
        return any(isinstance(listed[0][1], tuple) for listed in self.items.values() if listed)

    def where(self, split: str, label: str | None = None) -> str:
        """Where a split's (or one class's) images were listed, for the one-line errors."""
        if self.csv is None:
            return str(self.root / split) if label is None else f"class folder: {self.root / split / label}"
        rows = f"the {split} rows" if label is None else f"the {split} rows of class {label}"
        return f"{rows} of {self.csv}"


# ---------------------------------------------------------------------------------------------
# Tables of image paths and labels: any CSV (data=csv), NIH ChestX-ray14, CheXpert
#
# Every table becomes rows of {config key: cell}: `path_column`, optionally `patient_column` and
# `split_column`, and the label cells; `table_listing` turns them into the items the class
# folders would give. `source` names the table in errors ("data.csv /x.csv", or the file).

Rows = list[tuple[int, dict[str, str]]]
# CheXpert's values: 1.0 present, 0.0 absent, -1.0 uncertain, blank not mentioned
UNCERTAIN = {"ones": 1, "zeros": 0, "ignore": UNKNOWN}
BLANK = {"negative": 0, "ignore": UNKNOWN}


def read_table(path: Path, columns: dict[str, str], source: str | None = None) -> Rows:
    """(line number, {config key: cell}) per non-blank row, for the columns named in `columns`.

    `columns` maps a config key (label_column) to the column it names, so that a missing column
    is reported with the key that fixes it. The csv module, not pandas: 100,000 rows take well
    under a second, and quoting, BOMs and line numbers are handled as a spreadsheet writes them.
    """
    source = source or f"data.csv {path}"
    if not path.is_file():
        hint = "pass data.csv=/path/to/labels.csv" if source.startswith("data.csv") else "is data.root the dataset?"
        raise DataError(f"{source} does not exist or is not a file ({hint})")
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            for key, column in columns.items():
                if column not in header:
                    raise DataError(f"{source} has no column {column!r} (data.{key}); its columns: "
                                    f"{', '.join(header) or 'none'}")
            at = {key: header.index(column) for key, column in columns.items()}
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # blank lines, as spreadsheets leave at the end
                if len(cells) < len(header):
                    raise DataError(f"{source} line {reader.line_num}: {len(cells)} fields, the header "
                                    f"has {len(header)}")
                rows.append((reader.line_num, {key: cells[i].strip() for key, i in at.items()}))
    except OSError as error:
        raise DataError(f"{source} cannot be read: {error.strerror or error}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{source} is not a UTF-8 CSV file: {error}") from None
    if not rows:
        raise DataError(f"{source} has a header but no rows")
    return rows


def read_header(path: Path, source: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{source} does not exist or is not a file (is data.root the dataset?)")
    with open(path, newline="", encoding="utf-8-sig") as file:
        return [name.strip() for name in next(csv.reader(file), [])]


def csv_classes(data_cfg, rows: Rows, source: str) -> list[str]:
    """data.classes as given (every label must be one of them), else the labels sorted."""
    if data_cfg.classes is None:
        classes = sorted({row["label_column"] for _, row in rows})
    else:
        classes = [str(name) for name in data_cfg.classes]
        if len(set(classes)) != len(classes):
            raise DataError(f"data.classes lists a class twice: {classes}")
        for line, row in rows:
            if row["label_column"] not in classes:
                raise DataError(f"{source} line {line}: label {row['label_column']!r} is not in "
                                f"data.classes {classes}; add it there or remove the row")
    if "" in classes:
        line = next(line for line, row in rows if not row["label_column"])
        raise DataError(f"{source} line {line}: empty {data_cfg.label_column!r} (data.label_column)")
    if len(classes) < 2:
        raise DataError(f"{source} has one class ({', '.join(classes)}) in column "
                        f"{data_cfg.label_column!r}; need at least two")
    return classes


def chosen_findings(found: list[str], wanted, source: str) -> list[str]:
    """data.labels (each one of the table's findings), in that order; else all found, sorted."""
    if wanted is None:
        findings = sorted(found)
    else:
        findings = [str(name) for name in wanted]
        unknown = [name for name in findings if name not in found]
        if unknown:
            raise DataError(f"data.labels names {', '.join(map(repr, unknown))}, not a finding of {source}; "
                            f"its findings: {', '.join(sorted(found))}")
    if not findings:
        raise DataError(f"{source} has no findings to learn")
    return findings


def separated_labels(data_cfg, rows: Rows, source: str):
    """Findings joined in one cell ("Effusion|Nodule", NIH's "No Finding" for none): the findings
    and the row -> (1/0 per finding) function."""
    # config values read once: an OmegaConf lookup per cell made 100,000 rows take 23 s, not 1
    separator, none = data_cfg.label_separator, data_cfg.no_finding
    named = {}  # cell -> the findings it names (a table repeats few combinations)
    for _, row in rows:
        cell = row["label_column"]
        if cell not in named:
            named[cell] = {name for name in cell.split(separator) if name and name != none}
    findings = chosen_findings(sorted(set().union(*named.values())), data_cfg.labels, source)
    labels = {cell: tuple(int(name in found) for name in findings) for cell, found in named.items()}
    return findings, lambda row, line: labels[row["label_column"]]


def label_value(cell: str, uncertain: int, blank: int) -> int:
    """One finding's cell: 1 / 0 / -1 (uncertain) / blank, as data.uncertain and data.blank say."""
    if cell == "":
        return blank
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if value == -1:
        return uncertain
    if value not in (0, 1):
        raise ValueError(f"label {cell!r} is not 1, 0, -1 (uncertain) or blank")
    return int(value)


def column_labels(data_cfg, keys: list[str], source: str):
    """One column per finding (data.label_columns, CheXpert), read from the rows' `keys` in order:
    the row -> labels function."""
    uncertain, blank = UNCERTAIN[data_cfg.uncertain], BLANK[data_cfg.blank]  # read once, not per cell

    def label_of(row: dict[str, str], line: int) -> tuple[int, ...]:
        try:
            return tuple(label_value(row[key], uncertain, blank) for key in keys)
        except ValueError as error:
            raise DataError(f"{source} line {line}: {error}") from None
    return label_of


def csv_row_split(row: dict[str, str], line: int, source: str) -> str:
    """The split a row names in data.split_column (train when there is no split column)."""
    split = row.get("split_column", "train").lower()
    if split not in SPLITS:
        raise DataError(f"{source} line {line}: split {row['split_column']!r} in data.split_column "
                        f"must be one of {'|'.join(SPLITS)}")
    return split


def check_files(located: dict[str, int], root: Path, source: str) -> None:
    """Every listed image exists: a wrong data.root would otherwise fail deep inside decoding."""
    missing = [(line, image) for image, line in located.items() if not os.path.isfile(image)]
    if missing:
        line, image = missing[0]
        raise DataError(f"{source} line {line}: image not found: {image} ({len(missing)} of "
                        f"{len(located)} missing; paths are read relative to data.root={root})")


def table_listing(data_cfg, rows: Rows, root: Path, classes: list[str], label_of, source: str,
                  has_splits: bool, table: Path) -> Listing:
    """The rows as (path, label) items per split, each image once, with its patient.

    Items are sorted by (label, path) as `list_files` sorts them, so a CSV written from a folder
    layout, in any row order, gives the same splits, cache and batches as the folders themselves.
    """
    items: dict[str, list] = {name: [] for name in SPLITS}
    located: dict[str, int] = {}  # image -> its line
    patients: dict[str, str] = {}
    for line, row in rows:
        image = os.path.normpath(os.path.join(root, row["path_column"]))
        if image in located:
            raise DataError(f"{source} line {line}: {image} is listed again (first on line {located[image]})")
        located[image] = line
        items[csv_row_split(row, line, source)].append((image, label_of(row, line)))
        patients[image] = row.get("patient_column") or patient_id(image)
    check_files(located, root, source)
    items = {name: sorted(listed, key=lambda item: (item[1], item[0])) for name, listed in items.items()}
    return Listing(root, classes, table_splits(data_cfg, items, patients.__getitem__, source, has_splits),
                   patients.__getitem__, table)


def table_splits(data_cfg, items: dict[str, list], patient_of: Callable[[str], str], source: str,
                 has_splits: bool) -> dict[str, list]:
    """Train and test as the table says, or test carved by patient; val only when official."""
    if not has_splits:
        items["train"], items["test"] = split_by_patient(items["train"], data_cfg.test_fraction,
                                                         data_cfg.split_seed, patient_of)
    for name in SPLITS:
        if not items[name] and (name != "val" or data_cfg.val_split == "official"):
            fix = (" (data.val_split=official reads them; data.val_split=from_train carves val from train)"
                   if name == "val" else "")
            raise DataError(f"{source} has no {name} rows in column {data_cfg.split_column!r} "
                            f"(data.split_column){fix}")
    if data_cfg.val_split != "official":
        items["val"] = []  # carved from train later, as the folder layout's val/ is set aside
    return items


def index_csv(data_cfg) -> Listing:
    """data=csv: one label column (a class, or findings joined by data.label_separator), or one
    column per finding (data.label_columns); paths relative to data.root (default: the CSV's folder)."""
    path = Path(data_cfg.csv).expanduser()
    source = f"data.csv {path}"
    root = Path(data_cfg.root).expanduser() if data_cfg.root is not None else path.parent
    keys = ["path_column", "patient_column", "split_column"] + ([] if data_cfg.label_columns else ["label_column"])
    columns = {key: data_cfg[key] for key in keys if data_cfg[key] is not None}
    finding_columns = {}  # the columns of the findings data.labels picks, in its order
    if data_cfg.label_columns:
        named = list(data_cfg.label_columns)
        classes = chosen_findings(named, data_cfg.labels, source)
        finding_columns = {f"label_columns[{named.index(name)}]": name for name in classes}
    rows = read_table(path, {**columns, **finding_columns}, source)
    if finding_columns:
        label_of = column_labels(data_cfg, list(finding_columns), source)
    elif data_cfg.label_separator is not None:
        classes, label_of = separated_labels(data_cfg, rows, source)
    else:
        if data_cfg.labels is not None:
            raise DataError("data.labels picks the findings of multi-label data (data.label_columns or "
                            "data.label_separator); the classes of single-label data are data.classes")
        classes = csv_classes(data_cfg, rows, source)
        label_index = {name: label for label, name in enumerate(classes)}
        label_of = lambda row, line: label_index[row["label_column"]]  # noqa: E731
    return table_listing(data_cfg, rows, root, classes, label_of, source, data_cfg.split_column is not None, path)


NIH_TABLE = "Data_Entry_2017.csv"
NIH_TEST_LIST = "test_list.txt"  # the official test split (train_val_list.txt: everything else)


def dataset_folder(root) -> Path:
    if root is None or not Path(root).expanduser().is_dir():
        raise DataError(f"data.root does not exist or is not a folder: {root}")
    return Path(root).expanduser()


def nih_images(root: Path) -> dict[str, str]:
    """Image name -> its path below root, for every PNG under root/images*/ (os.walk and string
    paths: pathlib's objects made this half of indexing 112,120 images)."""
    found: dict[str, str] = {}
    for folder in sorted(root.glob("images*")):
        for directory, _, names in os.walk(folder):
            relative = os.path.relpath(directory, root)
            for name in names:
                if name.endswith(".png"):
                    found.setdefault(name, os.path.join(relative, name))
    return found


def index_nih(data_cfg) -> Listing:
    """data=nih: Data_Entry_2017.csv ("Finding Labels" joined by |, "No Finding", "Patient ID"),
    images found under images*/ (the archive's images_001/images/ ...), and the official
    test_list.txt as the test split (without it, test is carved by patient)."""
    if data_cfg.synthetic is not None:
        ensure_synthetic(data_cfg.root, data_cfg.synthetic)
    root = dataset_folder(data_cfg.root)
    table = root / NIH_TABLE
    source = str(table)
    rows = read_table(table, {"path_column": "Image Index", "label_column": "Finding Labels",
                              "patient_column": "Patient ID"}, source)
    found = nih_images(root)
    official_test = (root / NIH_TEST_LIST).is_file()
    test_names = set((root / NIH_TEST_LIST).read_text().split()) if official_test else set()
    for _, row in rows:
        name = row["path_column"]
        if official_test:
            row["split_column"] = "test" if name in test_names else "train"
        row["path_column"] = found.get(name, f"images*/{name}")
    classes, label_of = separated_labels(data_cfg, rows, source)
    return table_listing(data_cfg, rows, root, classes, label_of, source, official_test, table)


# CheXpert's columns that are not findings ("No Finding" is the absence of all of them)
CHEXPERT_META = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding")
CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


def index_chexpert(data_cfg) -> Listing:
    """data=chexpert: train.csv (train, val carved by patient) and valid.csv (the labelled
    held-out split: test) in data.root, paths like CheXpert-v1.0-small/train/patient00001/...
    relative to the folder above it. Uncertain (-1) and blank cells follow data.uncertain and
    data.blank; data.views=frontal keeps frontal images only."""
    root = dataset_folder(data_cfg.root)
    tables = {"train": root / "train.csv", "test": root / "valid.csv"}
    source = f"{root}/{{train,valid}}.csv"
    header = read_header(tables["train"], str(tables["train"]))
    findings = chosen_findings([name for name in header if name not in CHEXPERT_META], data_cfg.labels, source)
    finding_columns = {f"label_columns[{i}]": name for i, name in enumerate(findings)}
    columns = {"path_column": "Path", "views": "Frontal/Lateral", **finding_columns}
    rows = []
    for split, table in tables.items():
        for line, row in read_table(table, columns, str(table)):
            if data_cfg.views == "frontal" and row["views"] != "Frontal":
                continue
            patient = CHEXPERT_PATIENT.search(row["path_column"])
            row.update(split_column=split, patient_column=patient.group(1) if patient else "")
            rows.append((line, row))
    first = Path(rows[0][1]["path_column"]).parts[0] if rows else ""
    base = root.parent if first == root.name else root  # paths name the dataset's own folder
    return table_listing(data_cfg, rows, base, findings, column_labels(data_cfg, list(finding_columns), source),
                         source, True, tables["train"])


def index_folders(data_cfg) -> Listing:
    """The Kaggle layout: root/{train,val,test}/<class>/ (the embedded dataset generated first)."""
    if data_cfg.synthetic is not None:
        ensure_synthetic(data_cfg.root, data_cfg.synthetic)
    root = resolve_root(data_cfg.root)
    classes = find_classes(root / "train")
    official = data_cfg.val_split == "official"
    items = {"train": list_files(root / "train", classes),
             "val": list_files(root / "val", classes) if official else [],
             "test": list_files(root / "test", classes)}
    return Listing(root, classes, items)


def label_counts(split: Split, findings: list[str]) -> dict[str, dict[str, int]]:
    """A multi-label split's positive, negative and unknown labels per finding (what
    data.uncertain and data.blank change)."""
    labels = split.labels
    return {name: {"positive": int((labels[:, k] == 1).sum()), "negative": int((labels[:, k] == 0).sum()),
                   "unknown": int((labels[:, k] == UNKNOWN).sum())} for k, name in enumerate(findings)}


LAYOUTS = {"folders": index_folders, "csv": index_csv, "nih": index_nih, "chexpert": index_chexpert}


def load_dataset(data_cfg) -> Dataset:
    """Everything `run()` needs from the data config: classes and three decoded splits."""
    listing = LAYOUTS[data_cfg.layout](data_cfg)
    items = dict(listing.items)
    if data_cfg.val_split != "official":
        items["train"], items["val"] = split_by_patient(items["train"], data_cfg.val_fraction,
                                                        data_cfg.split_seed, listing.patient_of)
    cache_dir = Path(data_cfg.cache_dir).expanduser() / "decoded"
    splits = {}
    for name in SPLITS:
        chosen = subset(items[name], data_cfg.limit, data_cfg.split_seed)
        splits[name] = load_split(chosen, data_cfg.image_size, cache_dir, data_cfg.decode_workers, name)
        if len(splits[name]) == 0:
            raise DataError(f"no readable images in {listing.where(name)}")
    if listing.multilabel:
        counts = label_counts(splits["train"], listing.classes)
        log.info("train labels per finding (positive/negative/unknown): %s", ", ".join(
            f"{name} {c['positive']}/{c['negative']}/{c['unknown']}" for name, c in counts.items()))
        absent = [name for name, c in counts.items() if not c["positive"]]
        if absent:  # it can still be scored where other splits have it; its AUROC is null otherwise
            log.warning("no positive training image of %s", ", ".join(absent))
    else:  # a class of unreadable files only would leave one class to train on, and no error
        for label, name in enumerate(listing.classes):
            if not (splits["train"].labels == label).any():
                raise DataError(f"no readable images in {listing.where('train', name)}")
    dataset = Dataset(listing.root, listing.classes, **splits)
    if dataset.skipped:
        log.warning("skipped %d unreadable file(s): %s", len(dataset.skipped), ", ".join(dataset.skipped))
    return dataset

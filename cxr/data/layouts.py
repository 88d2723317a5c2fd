"""The dataset layouts cxr reads, each turned into a `Listing` (found, not yet decoded).

folders   the Kaggle layout root/{train,val,test}/<class>/ (data=chest_xray, the embedded data)
csv       any table of image paths and labels (data=csv)
nih       NIH ChestX-ray14: Data_Entry_2017.csv, images*/, test_list.txt (data=nih)
chexpert  CheXpert: train.csv and valid.csv (data=chexpert)
rsna      RSNA Pneumonia Detection: stage_2_train_labels.csv, stage_2_train_images/*.dcm (data=rsna)

A layout lists the (path, label) items of each split and who each image's patient is; carving
validation and decoding are cxr.data.dataset's. Tables are read by cxr.data.tables.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr.data.errors import DataError
from cxr.data.splits import CHEXPERT_PATH, COLUMN, FILE_NAME, Patients, layout_patients, split_by_patient
from cxr.data.tables import (
    Rows,
    chosen_findings,
    class_labels,
    column_labels,
    csv_classes,
    read_header,
    read_table,
    separated_labels,
)
from cxr.synthetic import ensure_synthetic
from cxr.task import Task

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Listing:
    """A layout read but not decoded: class order, (path, label) items per split, and who is whom.

    `items["val"]` is empty when validation is to be carved from train (the folders' val/ is read
    only with val_split=official; a table's val rows are always read).
    """

    root: Path
    task: Task  # binary, multi-class or multi-label, and the classes or findings in output order
    items: dict[str, list[tuple[str, int]]]
    patients: Patients  # of the images validation (or test) may be carved from
    csv: Path | None = None  # the CSV the items came from (None: class folders)

    @property
    def patient_of(self) -> Callable[[str], str]:
        return self.patients.of.__getitem__

    @property
    def classes(self) -> list[str]:
        return list(self.task.classes)

    def where(self, split: str, label: str | None = None) -> str:
        """Where a split's (or one class's) images were listed, for the one-line errors."""
        if self.csv is None:
            return str(self.root / split) if label is None else f"class folder: {self.root / split / label}"
        rows = f"the {split} rows" if label is None else f"the {split} rows of class {label}"
        return f"{rows} of {self.csv}"


# ---------------------------------------------------------------------------------------------
# Class folders


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
    patients = layout_patients(data_cfg)  # train's: validation is carved from it
    for path, _ in items["train"]:
        patients.add(path)
    return Listing(root, Task.of(classes, multilabel=False), items, patients)


# ---------------------------------------------------------------------------------------------
# Tables: the rows (cxr.data.tables) as the items the class folders would give


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


def table_listing(data_cfg, rows: Rows, root: Path, task: Task, label_of, source: str,
                  has_splits: bool, table: Path, patient_rule: str = FILE_NAME) -> Listing:
    """The rows as (path, label) items per split, each image once, with its patient (told by
    cxr.data.splits.patient_id under `patient_rule`).

    Items are sorted by (label, path) as `list_files` sorts them, so a CSV written from a folder
    layout, in any row order, gives the same splits, cache and batches as the folders themselves.
    """
    items: dict[str, list] = {name: [] for name in SPLITS}
    located: dict[str, int] = {}  # image -> its line
    patients = layout_patients(data_cfg, patient_rule)
    for line, row in rows:
        image = os.path.normpath(os.path.join(root, row["path_column"]))
        if image in located:
            raise DataError(f"{source} line {line}: {image} is listed again (first on line {located[image]})")
        located[image] = line
        items[csv_row_split(row, line, source)].append((image, label_of(row, line)))
        try:
            patients.add(image, row["path_column"], row.get("patient_column", ""))
        except ValueError as error:
            raise DataError(f"{source} line {line}: {error}") from None
    check_files(located, root, source)
    items = {name: sorted(listed, key=lambda item: (item[1], item[0])) for name, listed in items.items()}
    return Listing(root, task, table_splits(data_cfg, task, items, patients, source, has_splits), patients, table)


def table_splits(data_cfg, task: Task, items: dict[str, list], patients: Patients, source: str,
                 has_splits: bool) -> dict[str, list]:
    """Train and test as the table says, or test carved by patient; val as the table says when it
    has val rows (a table's own validation is never set aside), else carved from train later."""
    if not has_splits:
        items["train"], items["test"] = split_by_patient(items["train"], data_cfg.test_fraction,
                                                         data_cfg.split_seed, patients.of.__getitem__, task)
    for name in SPLITS:
        if not items[name] and (name != "val" or data_cfg.val_split == "official"):
            fix = (" (data.val_split=official reads them; data.val_split=from_train carves val from train)"
                   if name == "val" else "")
            raise DataError(f"{source} has no {name} rows in column {data_cfg.split_column!r} "
                            f"(data.split_column){fix}")
    if items["val"]:
        log.info("validation: the %d val rows of %s (data.split_column=%s); data.val_split=from_train carves "
                 "validation from train only in a table without val rows", len(items["val"]), source,
                 data_cfg.split_column)
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
        label_of = class_labels(classes)
    rule = FILE_NAME if data_cfg.patient_column is None else f"{COLUMN} {data_cfg.patient_column}"
    task = Task.of(classes, multilabel=bool(finding_columns) or data_cfg.label_separator is not None)
    return table_listing(data_cfg, rows, root, task, label_of, source, data_cfg.split_column is not None, path,
                         rule)


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
    return table_listing(data_cfg, rows, root, Task.of(classes, multilabel=True), label_of, source, official_test,
                         table, f"{COLUMN} Patient ID")


# CheXpert's columns that are not findings ("No Finding" is the absence of all of them)
CHEXPERT_META = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding")


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
            row["split_column"] = split
            rows.append((line, row))
    first = Path(rows[0][1]["path_column"]).parts[0] if rows else ""
    base = root.parent if first == root.name else root  # paths name the dataset's own folder
    return table_listing(data_cfg, rows, base, Task.of(findings, multilabel=True),
                         column_labels(data_cfg, list(finding_columns), source), source, True, tables["train"],
                         CHEXPERT_PATH)


RSNA_TABLE = "stage_2_train_labels.csv"
RSNA_IMAGES = "stage_2_train_images"
# the Kaggle folders' class names, so that a model trained on either set can be scored on the other
RSNA_CLASSES = ("NORMAL", "PNEUMONIA")


def index_rsna(data_cfg) -> Listing:
    """data=rsna: the RSNA Pneumonia Detection Challenge's stage_2_train_labels.csv (patientId, a
    box x, y, width, height, Target; one row per box, one row with Target 0 for an image without)
    and stage_2_train_images/<patientId>.dcm. One label per image: PNEUMONIA when any of its rows
    has Target 1 (a box), else NORMAL; the patient is patientId; test is carved by patient
    (data.test_fraction)."""
    root = dataset_folder(data_cfg.root)
    table = root / RSNA_TABLE
    source = str(table)
    pneumonia: dict[str, bool] = {}  # patientId -> any box, in the table's order
    first_line: dict[str, int] = {}
    for line, row in read_table(table, {"path_column": "patientId", "label_column": "Target"}, source):
        if row["label_column"] not in ("0", "1"):
            raise DataError(f"{source} line {line}: Target {row['label_column']!r} is not 0 or 1")
        patient = row["path_column"]
        first_line.setdefault(patient, line)
        pneumonia[patient] = pneumonia.get(patient, False) or row["label_column"] == "1"
    rows = [(first_line[patient], {"path_column": f"{RSNA_IMAGES}/{patient}.dcm", "patient_column": patient,
                                   "label_column": RSNA_CLASSES[int(boxed)]}) for patient, boxed in pneumonia.items()]
    classes = list(RSNA_CLASSES)
    return table_listing(data_cfg, rows, root, Task.of(classes, multilabel=False), class_labels(classes), source,
                         False, table, f"{COLUMN} patientId")


LAYOUTS = {"folders": index_folders, "csv": index_csv, "nih": index_nih, "chexpert": index_chexpert,
           "rsna": index_rsna}

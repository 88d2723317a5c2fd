"""Find the images (class folders or a table), split them by patient, decode them -> `Dataset`.

    tables.py   reading CSV tables and parsing label cells (classes; findings: 1/0/-1/blank, joined)
    layouts.py  the layouts (Kaggle folders, any CSV, NIH, CheXpert, RSNA), each -> a `Listing`
    splits.py   who each image's patient is (one function; a DICOM header's PatientID only as a
                salted hash), carving by patient, subsets
    dataset.py  `load_dataset` -> `Dataset`: validation carved, every split decoded; `load_target`
                -> `Target`: the splits a trained model is evaluated on (cxr.evaluate)
    errors.py   `DataError`, the one-line error of an unusable dataset

The names below are the package's public interface.
"""

from cxr.data.dataset import Dataset, Target, label_counts, load_dataset, load_target
from cxr.data.errors import DataError
from cxr.data.layouts import LAYOUTS, SPLITS, find_classes, is_visible, list_files, resolve_root
from cxr.data.splits import patient_id, split_by_patient, subset

__all__ = ["LAYOUTS", "SPLITS", "DataError", "Dataset", "Target", "find_classes", "is_visible", "label_counts",
           "list_files", "load_dataset", "load_target", "patient_id", "resolve_root", "split_by_patient", "subset"]

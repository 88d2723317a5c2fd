"""`python -m cxr.bench index`: indexing a large table alone (no decoding): data=nih and data=csv
with the findings joined in one column, each --repeats times (median), and carving validation by
patient. The images are hard links to 8 small PNGs, so a table of 100,000 rows costs seconds to lay
out.
"""

import argparse
import csv
import os
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr.bench.options import add_common, add_scale, scale_of, work_folder
from cxr.bench.runs import compose_train
from cxr.bench.timing import machine, publish, timed
from cxr.data import LAYOUTS, split_by_patient

HELP = "indexing a large NIH-layout table and a generic CSV, no decoding (s)"
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
NIH_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


@dataclass(frozen=True)
class Scale:
    rows: int
    repeats: int


FULL = Scale(rows=100_000, repeats=3)
QUICK = Scale(rows=2_000, repeats=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scale(parser, FULL, QUICK, {"rows": "rows of each table (4 images per patient, every fifth patient test)",
                                    "repeats": "timings of each layout (median)"})
    add_common(parser, "index", "seconds: 2,000 rows, one timing each", device=False)


def write_index_tables(root: Path, rows: int) -> None:
    """`rows` images as hard links to 8 small PNGs in the NIH layout (Data_Entry_2017.csv,
    test_list.txt, images_XXX/images/, 4 images per patient, 14 findings at 5% each), and the same
    as a generic CSV (path, findings joined by |, patient, split)."""
    rng = np.random.default_rng(0)
    seeds = [root / f"seed{k}.png" for k in range(8)]
    for path in seeds:
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    entries, generic = [], []
    for i in range(rows):
        patient, name = i // 4 + 1, f"{i // 4 + 1:08d}_{i % 4:03d}.png"
        relative = Path(f"images_{i // 10_000 + 1:03d}") / "images" / name
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(seeds[i % 8], root / relative)
        findings = "|".join(f for f in NIH_FINDINGS if rng.random() < 0.05) or "No Finding"
        entries.append([name, findings, i % 4, patient, 50, "M", "PA", 64, 64, 0.14, 0.14])
        generic.append([str(relative), findings, patient, "test" if patient % 5 == 0 else "train"])
    for path, header, table in ((root / "Data_Entry_2017.csv", NIH_COLUMNS, entries),
                                (root / "generic.csv", ["Path", "Findings", "Patient", "Split"], generic)):
        with open(path, "w", newline="") as file:
            csv.writer(file).writerows([header, *table])
    (root / "test_list.txt").write_text("".join(f"{row[0]}\n" for row in entries if row[3] % 5 == 0))


def measure(work: Path, scale: Scale) -> dict:
    write_index_tables(work, scale.rows)
    layouts = {"nih": ["data=nih", f"data.root={work}"],
               "csv_findings": ["data=csv", f"data.csv={work / 'generic.csv'}", "data.label_column=Findings",
                                "data.label_separator='|'", "data.patient_column=Patient", "data.split_column=Split"]}
    report = {"rows": scale.rows, "findings": len(NIH_FINDINGS)}
    cpu = torch.device("cpu")
    for name, overrides in layouts.items():
        data_cfg = compose_train(overrides).data
        index = partial(LAYOUTS[data_cfg.layout], data_cfg)
        seconds = [timed(index, cpu) for _ in range(scale.repeats)]
        report[f"{name}_s"] = statistics.median(seconds)
        print(f"index  {name:12s} {scale.rows} rows: " + ", ".join(f"{t:.2f}" for t in seconds)
              + f" s (median {report[f'{name}_s']:.2f})", flush=True)
    listing = index()
    carve = partial(split_by_patient, listing.items["train"], 0.1, 0, listing.patient_of, listing.task)
    report["val_carve_s"] = timed(carve, cpu)
    report["items"] = {split: len(items) for split, items in listing.items.items()}
    return report


def run(args: argparse.Namespace) -> dict:
    scale = scale_of(args, FULL, QUICK)
    with work_folder(args.work, "index") as work:
        report = {**machine(torch.device("cpu")), "quick": args.quick, **measure(work.path, scale)}
    publish(report, args.out)
    return report

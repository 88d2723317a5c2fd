"""Tables of image paths and labels: reading a CSV, and parsing its label cells.

Every table becomes rows of {config key: cell} (`path_column`, `label_column`, `patient_column`,
`split_column`, `label_columns[i]`), so that a missing column is reported with the key that fixes
it; cxr.data.layouts turns the rows into the items the class folders would give. Labels are a
class index (single-label) or a tuple of 1 / 0 / UNKNOWN per finding (multi-label). `source`
names the table in errors ("data.csv /x.csv", or the file).
"""

import csv
import math
from pathlib import Path

from cxr.data.errors import DataError
from cxr.task import UNKNOWN

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


def class_labels(classes: list[str]):
    """One class name per row (data.label_column): the row -> class index function."""
    label_index = {name: label for label, name in enumerate(classes)}
    return lambda row, line: label_index[row["label_column"]]


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

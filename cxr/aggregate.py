"""A sweep's report: every job's result.json -> results.md, results.csv, results.png, curves.png;
an evaluation sweep's (python -m cxr.evaluate -m ...) -> transfer.md, transfer.csv.

    python -m cxr.aggregate outputs/sweeps/<stamp>     # exits 1 when a job did not finish ok

The same `aggregate()` runs as a Hydra callback at the end of every multirun (conf/train.yaml,
`hydra.callbacks`). It reads each job's result.json from disk, never the sweep's memory: jobs may
have run in other processes (joblib) or on other machines (submitit), and a report can be rebuilt
at any time. A job that failed is a row marked with its status and error; the report is written
all the same, and the command then exits 1.

Jobs that differ only in `seed` are grouped into one row per variant: mean ± std over the seeds,
n, and a 95% interval of the mean test accuracy. results.md then lists the single jobs as well;
results.csv always holds one row per job.

Multi-label runs (one sigmoid per finding: `data.multilabel` in result.json) keep the same columns,
read as macro means over the findings, and add a test AUROC per finding: a table after the main
one in results.md, and columns `test/auroc/<finding>`, `test/sensitivity/<finding>` and
`test/specificity/<finding>` at the end of results.csv.
"""

import argparse
import csv
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402

from cxr import compare, results  # noqa: E402
from cxr.config import keys_with  # noqa: E402
from cxr.results import OK, RESULT_FILE  # noqa: E402
from cxr.tensorboard import write_experiment  # noqa: E402

log = logging.getLogger("cxr.aggregate")

MISSING = "missing"  # a job folder without result.json: killed hard, or still running
CONFIDENCE = 0.95
REPORT_FILES = ("results.md", "results.csv", "results.png", "curves.png")
SPLIT_COLORS = (("train", "tab:blue"), ("val", "tab:orange"))


@dataclass(frozen=True)
class Column:
    header: str  # results.md and the terminal (the seed's names come first)
    key: str  # results.csv: the name used in result.json and TensorBoard
    # how it is shown: text | int | percent | auroc | lr | ms | interval | flag, and for differences
    # delta (+0.012) | delta_percent | delta_interval | delta_percent_interval | p
    kind: str = "text"
    better: str | None = None  # max | min for metrics: the best value is bold, seeds are averaged


SEED_COLUMNS = (
    Column("Model", "model"),
    Column("Hidden Layer", "model.hidden_layers", "int"),
    Column("Dense Count", "model.dense", "int"),
    Column("Learning Rate", "optimizer.lr", "lr"),
    Column("Accuracy", "test/acc", "percent", "max"),
    Column("Learning Time(ms)", "time.train_ms", "ms", "min"),
)
COLUMNS = SEED_COLUMNS + (
    Column("Accuracy 95% CI", "test/acc_ci95", "interval"),
    # the accuracy of always answering the commonest test class: the floor a model must beat
    Column("Majority Rate", "majority_rate", "percent"),
    # mean of sensitivity and specificity: what accuracy hides on an imbalanced test split
    Column("Balanced Accuracy", "test/balanced_acc", "percent", "max"),
    # at the reference's fixed threshold (Accuracy uses the one chosen on validation)
    Column("Accuracy at 0.5", "test/acc_at_0.5", "percent", "max"),
    Column("Val Accuracy", "val/acc", "percent", "max"),
    Column("Val AUROC", "val/auroc", "auroc", "max"),
    Column("Test AUROC", "test/auroc", "auroc", "max"),
    Column("Sensitivity", "test/sensitivity", "percent", "max"),
    Column("Specificity", "test/specificity", "percent", "max"),
    # expected calibration error of the test probabilities (15 equal-width bins; cxr.calibration)
    Column("ECE", "test/ece", "auroc", "min"),
    Column("Best Epoch", "best_epoch", "int"),
    # only where trainer.patience stopped a run (an empty column is left out of results.md)
    Column("Stopped At", "stopped_epoch", "int"),
    Column("Epochs", "epochs", "int"),
    Column("Seed", "seed", "int"),
    Column("Weights", "model.weights"),
    Column("Device", "device"),
    Column("Status", "status"),
    Column("Error", "error"),
    # constant predictions, or accuracy below the majority rate: finished, but learned nothing
    Column("Warning", "warning"),
    Column("Best (val AUROC)", "best_val_auroc", "flag"),
)
# every other key that describes a run (cxr.config's `described` keys): all in results.csv, and in
# results.md where the sweep's jobs differ in it
CONFIG_COLUMNS = tuple(Column(key, key) for key in keys_with("describes")
                       if key not in {c.key for c in COLUMNS} | {"variant", "trainer.epochs"})
# the tests behind a difference's p (cxr.compare's p_test)
TEST_NAMES = {"DeLong": "DeLong's test", "bootstrap": "the paired bootstrap test (z = Δ / sd of its resamples)"}
# (low, high) pairs: two columns each in results.csv
INTERVAL_KINDS = ("interval", "delta_interval", "delta_percent_interval")
# the spread of a difference is shown without a sign
UNSIGNED = {"delta": "auroc", "delta_percent": "percent"}
N_COLUMN = Column("n", "n", "int")  # grouped rows only: the seeds that finished
# multi-label runs: a value per finding of these, keyed `<metric>/<finding>` as in result.json
FINDING_METRICS = (("test/auroc", "auroc"), ("test/sensitivity", "percent"),
                   ("test/specificity", "percent"))
# the per-finding table's last column: the run's own macro mean (undefined findings left out)
MEAN_AUROC_COLUMN = Column("Mean", "test/auroc", "auroc", "max")


def finding_columns(findings: list[str], metrics=FINDING_METRICS) -> tuple[Column, ...]:
    """A column per finding and metric (`test/auroc/Effusion`), headed by the finding's name."""
    return tuple(Column(finding, f"{metric}/{finding}", kind, "max")
                 for metric, kind in metrics for finding in findings)


# the differences section (cxr.compare): each job against the chosen row's job, on the same images
DIFFERENCE_COLUMNS = (
    Column("Compared With", "compared_with"),
    Column("ΔAUROC", "diff/auroc", "delta"),
    Column("ΔAUROC 95% CI", "diff/auroc_ci95", "delta_interval"),
    Column("ΔBalanced Acc", "diff/balanced_acc", "delta_percent"),
    Column("ΔBalanced Acc 95% CI", "diff/balanced_acc_ci95", "delta_percent_interval"),
    Column("p", "p", "p"),
    Column("Test", "p_test"),
    Column("p (Holm)", "p_holm", "p"),
    Column("Verdict", "verdict"),
)
# with seeds: each variant's same-seed differences over its seeds
SEED_DIFFERENCE_COLUMNS = (
    Column("Seeds Compared", "seeds_compared", "int"),
    Column("ΔAUROC over Seeds", "diff/auroc", "delta"),
    # the mean half-width of the per-seed paired intervals: how much the images alone move ΔAUROC
    Column("Test-Set Noise (±)", "test_noise", "auroc"),
    Column("ΔBalanced Acc over Seeds", "diff/balanced_acc", "delta_percent"),
    Column("Seed Verdicts", "seed_verdicts"),
    Column("Verdict", "verdict"),
)
# multi-label: each finding's AUROC difference and its DeLong p (raw and Holm-adjusted)
FINDING_DIFFERENCES = (("diff/auroc", "Δ", "delta"), ("p", "p", "p"), ("p_holm", "p (Holm)", "p"))


def finding_difference_columns(findings: list[str], parts=FINDING_DIFFERENCES) -> tuple[Column, ...]:
    return tuple(Column(f"{finding} {header}", f"{key}/{finding}", kind)
                 for key, header, kind in parts for finding in findings)


@dataclass(frozen=True)
class Spread:
    """A metric over seeds: mean, sample standard deviation (NaN for one seed) and n."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list) -> "Spread | None":
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return cls(float(np.mean(values)), std, len(values))


@dataclass
class Report:
    jobs: list[dict]  # one row per job, raw values keyed by Column.key
    variants: list[dict] | None  # one row per variant over seeds; None when no seeds were repeated
    files: list[Path] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # multi-label jobs' findings; [] when none
    varying: tuple[Column, ...] = ()  # the CONFIG_COLUMNS in which the jobs differ

    def columns(self, grouped: bool) -> tuple[Column, ...]:
        """The main table's: the seed's, what the sweep varied, the rest (n after the interval)."""
        rest = COLUMNS[len(SEED_COLUMNS):]
        if grouped:
            rest = rest[:1] + (N_COLUMN,) + rest[1:]
        return SEED_COLUMNS + self.varying + rest

    @property
    def ok(self) -> bool:
        return all(row["status"] == OK for row in self.jobs)


# ---------------------------------------------------------------------------------------------
# Reading the sweep


def job_number(job_dir: Path) -> tuple:
    """Hydra's job folders start with the job number (`12_model.dense=8`): sort 2 before 10."""
    match = re.match(r"(\d+)_", job_dir.name)
    return (int(match.group(1)) if match else math.inf, job_dir.name)


def read_jobs(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """(job dir, result.json) for every job folder, in job order; a job without one is 'missing'."""
    job_dirs = {p.parent for p in sweep_dir.glob(f"*/{RESULT_FILE}")}
    job_dirs |= {p.parent for p in sweep_dir.glob("*/.hydra")}
    jobs = []
    for job_dir in sorted(job_dirs, key=job_number):
        record = results.read(job_dir)
        if record is None:
            record = {"status": MISSING, "error": f"no readable {RESULT_FILE}: killed, or still running"}
        jobs.append((job_dir, record))
    return jobs


def parse_overrides(result: dict) -> dict[str, str]:
    """{key: override} of a job's command-line overrides (`+x=1` and `x=1` share the key x)."""
    return {o.split("=", 1)[0].lstrip("+~"): o for o in result.get("overrides") or []}


def model_label(result: dict, varying: list[str]) -> str:
    """The variant name plus the overrides that tell this job apart from the others in the sweep."""
    variant = result.get("variant") or "custom"
    overrides = parse_overrides(result)
    # `experiment=resultset3` says nothing the variant name does not say already
    parts = [show_override(overrides[k]) for k in varying
             if k in overrides and overrides[k] != f"experiment={variant}"]
    return " ".join(([variant] if variant != "custom" else []) + parts) or variant


def show_override(override: str) -> str:
    """`model=densenet121` is shown as the backbone's name alone: the Model column names it."""
    key, _, value = override.partition("=")
    return value if key == "model" else override


def job_findings(result: dict) -> list[str]:
    """A multi-label run's findings (`data.classes`); [] for a single-label run."""
    data = result.get("data") or {}
    return list(data.get("classes") or []) if data.get("multilabel") else []


def job_row(job_dir: Path, result: dict, label: str) -> dict:
    values = results.flat(result)
    findings = job_findings(result)
    row = {column.key: values.get(column.key) for column in COLUMNS + CONFIG_COLUMNS + finding_columns(findings)}
    row.update({
        "job": job_dir.name, "overrides": " ".join(result.get("overrides") or []), "model": label,
        # weights null (random init) is shown as Hydra spells it, not as a missing value
        "model.weights": str(values.get("model.weights") or "null") if result.get("model") else None,
        "status": result.get("status", MISSING), "best_val_auroc": False,
        "warning": "; ".join(result.get("warnings") or []) or None,
        "history": result.get("history") or [], "test_size": values.get("data.test"),
        "findings": findings, "macro_findings": result.get("macro_findings"),
    })
    return row


def variant_row(label: str, jobs: list[dict], columns=COLUMNS) -> dict:
    """One variant over its seeds: metrics as Spread over the jobs that finished, the rest as is."""
    finished = [job for job in jobs if job["status"] == OK]
    failed = [job for job in jobs if job["status"] != OK]
    row = {"model": label, "n": len(finished), "jobs": jobs, "best_val_auroc": False,
           "status": OK if not failed else f"{len(finished)}/{len(jobs)} ok",
           "error": failed[0]["error"] if failed else None}
    for column in columns:
        if column.key in row or column.kind == "interval":  # set above, or below
            continue
        values = [job.get(column.key) for job in (finished or jobs)]
        if column.better:
            row[column.key] = Spread.of(values)
        else:  # one value when the seeds agree (they do for the config), else the distinct ones
            distinct = list({repr(v): v for v in values if v is not None}.values())  # lists too (betas)
            row[column.key] = distinct[0] if len(distinct) == 1 else (distinct or None)
    test_size = next((job["test_size"] for job in jobs if job["test_size"]), None)
    row["test/acc_ci95"] = accuracy_interval(row["test/acc"], test_size)
    return row


def accuracy_interval(accuracy: Spread | None, test_size: int | None) -> tuple | None:
    """95% interval of a variant's mean test accuracy over its seeds, from two error sources
    whose half-widths add in quadrature: how training varies with the seed (Student-t, n-1
    degrees of freedom) and which images the test set happens to hold (normal approximation,
    p(1-p)/N; every seed is tested on the same N images, so averaging seeds does not shrink it).
    None for a single seed: its seed-to-seed part is unknown."""
    if accuracy is None or accuracy.n < 2:
        return None
    p, tail = accuracy.mean, (1 + CONFIDENCE) / 2
    seed_half = stats.t.ppf(tail, accuracy.n - 1) * accuracy.std / math.sqrt(accuracy.n)
    test_half = stats.norm.ppf(tail) * math.sqrt(p * (1 - p) / test_size) if test_size else 0.0
    half = math.hypot(seed_half, test_half)
    return (max(0.0, p - half), min(1.0, p + half))


def number(value) -> float:
    """The comparable number of a cell: a Spread's mean; NaN when there is none."""
    value = value.mean if isinstance(value, Spread) else value
    return math.nan if value is None else float(value)


def mark_best(rows: list[dict]) -> None:
    """Flag the finished row with the highest validation AUROC: how a variant or an Optuna trial
    is chosen. Test metrics never take part: picking by them would overstate the result."""
    candidates = [r for r in rows if r["status"] == OK and not math.isnan(number(r["val/auroc"]))]
    if candidates:
        best = max(candidates, key=lambda r: number(r["val/auroc"]))  # ties: the first job
        best["best_val_auroc"] = True


def build_report(jobs: list[tuple[Path, dict]]) -> Report:
    overrides = [parse_overrides(result) for _, result in jobs]
    keys = list(dict.fromkeys(k for job in overrides for k in job))
    varying = [k for k in keys if len({job.get(k) for job in overrides}) > 1]
    rows = [job_row(d, r, model_label(r, varying)) for d, r in jobs]
    mark_best(rows)
    # union over the jobs, in the order their data.classes give
    findings = list(dict.fromkeys(finding for row in rows for finding in row["findings"]))
    groups: dict[str, list[dict]] = {}
    for (_, result), row in zip(jobs, rows, strict=True):
        groups.setdefault(model_label(result, [k for k in varying if k != "seed"]), []).append(row)
    varying = tuple(c for c in CONFIG_COLUMNS if len({repr(row[c.key]) for row in rows}) > 1)
    variants = None
    if any(len(members) > 1 for members in groups.values()):
        columns = COLUMNS + CONFIG_COLUMNS + finding_columns(findings)
        variants = [variant_row(label, members, columns) for label, members in groups.items()]
        mark_best(variants)
    report = Report(rows, variants, findings=findings, varying=varying)
    add_differences(jobs, report)
    return report


def references(report: Report) -> dict[int, int | None]:
    """Which job each job is compared with (indices into report.jobs): the chosen job; with seeds,
    the chosen variant's job of the same seed (None: it has none). The chosen jobs are left out."""
    if report.variants is None:
        chosen = [i for i, row in enumerate(report.jobs) if row["best_val_auroc"]]
        return {i: chosen[0] for i in range(len(report.jobs)) if chosen and i != chosen[0]}
    chosen = next((variant for variant in report.variants if variant["best_val_auroc"]), None)
    if chosen is None:
        return {}
    own = {id(job) for job in chosen["jobs"]}
    by_seed = {row["seed"]: i for i, row in enumerate(report.jobs) if id(row) in own}
    return {i: by_seed.get(row["seed"]) for i, row in enumerate(report.jobs) if id(row) not in own}


def add_differences(jobs: list[tuple[Path, dict]], report: Report) -> None:
    """Each job's difference from its reference (cxr.compare: same test images, paired bootstrap,
    DeLong, Holm across the jobs) into its row; with seeds, each variant's over its seeds."""
    pairs = references(report)
    compared = [(i, j) for i, j in pairs.items() if j is not None]
    for (i, j), difference in zip(compared, compare.differences([(jobs[i], jobs[j]) for i, j in compared]),
                                  strict=True):
        report.jobs[i].update(difference, compared_with=report.jobs[j]["model"])
    for i, j in pairs.items():
        if j is None:
            report.jobs[i]["verdict"] = f"not compared: the chosen variant has no job of seed {report.jobs[i]['seed']}"
    for j in set(pairs.values()) - {None}:
        report.jobs[j]["verdict"] = "reference"
    for variant in report.variants or []:
        variant.update(seed_differences(variant["jobs"]))


def seed_differences(jobs: list[dict]) -> dict:
    """A variant's same-seed differences over its seeds: ΔAUROC and Δbalanced accuracy as Spread
    (their sd is training noise), the mean half-width of the per-seed intervals (test-set noise),
    the verdicts, and the variant's: better or worse only when every seed's comparison says so."""
    compared = [job for job in jobs if "p_holm" in job]
    if not compared:  # the chosen variant ("reference"), or none of its seeds could be compared
        verdicts = {job.get("verdict") for job in jobs}
        return {"verdict": verdicts.pop() if len(verdicts) == 1 else "not compared"}
    verdicts = [job["verdict"] for job in compared]
    half_widths = [(ci[1] - ci[0]) / 2 for ci in (job["diff/auroc_ci95"] for job in compared) if ci]
    return {"seeds_compared": len(compared),
            "diff/auroc": Spread.of([job["diff/auroc"] for job in compared]),
            "diff/balanced_acc": Spread.of([job["diff/balanced_acc"] for job in compared]),
            "test_noise": float(np.mean(half_widths)) if half_widths else None,
            "seed_verdicts": ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)),
            "verdict": verdicts[0] if len(set(verdicts)) == 1 else "within noise"}


# ---------------------------------------------------------------------------------------------
# Writing it


# how a Column's kind shows a value (text and int: as it is)
FORMATS = {
    "percent": lambda v: f"{100 * v:.1f}",
    "interval": lambda v: f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]",
    "auroc": lambda v: f"{v:.3f}",
    "lr": lambda v: f"{v:g}",
    "ms": lambda v: f"{v:.0f}",
    "flag": lambda v: "yes" if v else "",
    "delta": lambda v: f"{v:+.3f}",
    "delta_percent": lambda v: f"{100 * v:+.1f}",
    "delta_interval": lambda v: f"[{v[0]:+.3f}, {v[1]:+.3f}]",
    "delta_percent_interval": lambda v: f"[{100 * v[0]:+.1f}, {100 * v[1]:+.1f}]",
    "p": lambda v: "<0.001" if v < 0.001 else f"{v:.3f}",
}


def show(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, Spread):
        mean = show(value.mean, kind)
        return mean if value.n < 2 else f"{mean} ± {show(value.std, UNSIGNED.get(kind, kind))}"
    if isinstance(value, list):  # the distinct values of a group
        return ", ".join(show(v, kind) for v in value)
    return FORMATS.get(kind, str)(value)


def best_values(rows: list[dict], columns) -> dict[str, float]:
    """The best number of each metric column over the finished rows (bold in the table)."""
    best = {}
    for column in (c for c in columns if c.better):
        values = [number(r.get(column.key)) for r in rows if r["status"] == OK]
        values = [v for v in values if not math.isnan(v)]
        if values:
            best[column.key] = max(values) if column.better == "max" else min(values)
    return best


def markdown_table(rows: list[dict], columns, keep=SEED_COLUMNS) -> str:
    """A Markdown table padded to line up in a terminal too; the best of each metric in bold."""
    # columns that no row fills (no errors, no bootstrap) are left out; `keep`'s always stay
    columns = [c for c in columns if c in keep
               or any(show(r.get(c.key), c.kind) not in ("—", "") for r in rows)]
    best = best_values(rows, columns)
    lines = [[c.header for c in columns]]
    for row in rows:
        cells = []
        for column in columns:
            # a `|` in an error ("flatten|avg") would split the cell
            text = show(row.get(column.key), column.kind).replace("|", "\\|")
            # compared as shown: values that print the same are equally best
            is_best = (column.key in best and row["status"] == OK
                       and show(number(row.get(column.key)), column.kind)
                       == show(best[column.key], column.kind))
            cells.append(f"**{text}**" if is_best else text)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    right = [c.kind not in ("text", "flag") for c in columns]

    def render(cells):
        padded = (t.rjust(w) if r else t.ljust(w)
                  for t, w, r in zip(cells, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right, strict=True))
    return "\n".join([render(lines[0]), f"|{rule}|", *(render(cells) for cells in lines[1:])])


MULTILABEL_NOTE = (
    "Multi-label runs (one sigmoid per finding): Accuracy is label-wise accuracy, the share of "
    "known (image, finding) labels decided right at per-finding thresholds chosen on validation; "
    "Majority Rate is the same for always answering each finding's commoner value. Test AUROC, "
    "Val AUROC, Balanced Accuracy, Sensitivity and Specificity are macro means over the findings "
    "(a finding whose AUROC is undefined, one class only in the split, is left out of the AUROC "
    "mean). Test AUROC per finding: —, undefined in that split; Mean is the run's Test AUROC.")


def notes(report: Report) -> list[str]:
    """What the numbers mean (which differences are real: `differences_section`)."""
    # one image is one decision of a single-label run only (a multi-label image holds several)
    sizes = sorted({job["test_size"] for job in report.jobs
                    if job["test_size"] and not job["findings"]})
    lines = ["Accuracy: test accuracy (%) of the checkpoint and decision threshold chosen on "
             "validation. Learning Time(ms): wall time of training and validation. **Bold**: the "
             "best value of a metric column."]
    if report.findings:
        lines.append(MULTILABEL_NOTE)
        averaged = {", ".join(job["macro_findings"]) for job in report.jobs if job["macro_findings"]}
        lines.append("Macro means and their 95% intervals average over the findings that a test split "
                     f"defines, the same ones in every bootstrap resample: {'; '.join(sorted(averaged)) or '—'}. "
                     "Per-finding intervals resample each finding within its own positives, negatives and "
                     "unknowns; the macro ones within the images' label combinations.")
    if sizes:
        steps = ", ".join(f"{100 / n:.2f} points (N = {n})" for n in sizes)
        lines.append(f"One test image is 100/N = {steps} of accuracy: smaller differences are "
                     "ties.")
    if report.variants is not None:
        lines.append("Variants: mean ± std over seeds (sample std), n = seeds that finished. "
                     "Accuracy 95% CI: for the mean over seeds, combining how training varies "
                     "with the seed (Student-t, n-1 degrees of freedom) with the test set's own "
                     "sampling error (normal approximation, p(1-p)/N, not reduced by more seeds: "
                     "they share the test images); half-widths added in quadrature, clipped to "
                     "[0, 100]. Jobs: percentile bootstrap over the test images.")
    else:
        lines.append("Accuracy 95% CI: percentile bootstrap over the test images "
                     "(trainer.bootstrap resamples): the test set's sampling error only; sweep "
                     "`seed=0,1,2` to see how much training itself varies.")
    lines.append("Best (val AUROC): the row with the highest validation AUROC, which is how a "
                 "variant or an Optuna trial is chosen; test metrics never take part in the "
                 "choice.")
    lines.append("ECE: expected calibration error of the test probabilities (15 equal-width bins; 0 is "
                 "perfectly calibrated); result.json holds the equal-mass ECE, Brier score and NLL beside it. "
                 "Whether a row differs from the chosen one beyond noise: the differences section below.")
    return lines


def differences_section(report: Report) -> list[str]:
    """## Differences from the chosen row: every job against its reference on the same test images
    (cxr.compare), per finding for multi-label sweeps, and over seeds for variants."""
    rows = report.variants if report.variants is not None else report.jobs
    chosen = next((row for row in rows if row["best_val_auroc"]), None)
    if chosen is None:
        return []
    tests = sorted({job["p_test"] for job in report.jobs if job.get("p_test")})
    text = (f"Each job against **{chosen['model']}** (the best validation AUROC), both models scored on the "
            "same test images (a job tested on other images is not compared). Δ = job − chosen; 95% CI: "
            f"paired bootstrap, {compare.RESAMPLES} resamples of the same image indices for both, stratified by "
            f"class. p: {' or '.join(TEST_NAMES[t] for t in tests) or '—'} for the AUROC difference; p (Holm): "
            f"adjusted across the comparisons. Verdict: better or worse where p (Holm) < {compare.ALPHA}, else "
            "within noise. A difference may be real and still too small to matter: read the interval.")
    if report.variants is not None:
        text += (" With seeds, each job is compared with the chosen variant's job of the same seed. Over "
                 "Seeds: the mean ± sd of those differences; the sd is training noise (how much the "
                 "difference moves with the seed), Test-Set Noise the mean half-width of their intervals "
                 "(how much it moves with the images). A variant is better or worse only when every seed's "
                 "comparison says so.")
    model, verdict = COLUMNS[0], DIFFERENCE_COLUMNS[-1]
    section = ["## Differences from the chosen row", text,
               markdown_table(report.jobs, (model, *DIFFERENCE_COLUMNS), keep=(model, verdict))]
    if report.findings:
        columns = (model, *finding_difference_columns(report.findings, FINDING_DIFFERENCES[::2]))
        section += ["### ΔAUROC per finding (DeLong p, Holm-adjusted across the jobs)",
                    markdown_table(report.jobs, columns, keep=columns)]
    if report.variants is not None:
        columns = (model, *SEED_DIFFERENCE_COLUMNS)
        section += ["### Over seeds", markdown_table(report.variants, columns, keep=(model, verdict))]
    return section


def write_markdown(report: Report, path: Path) -> str:
    """results.md; returns the main table (variants when seeds were repeated, else jobs)."""
    if report.variants is None:
        main = markdown_table(report.jobs, report.columns(grouped=False))
        sections = [main]
    else:
        main = markdown_table(report.variants, report.columns(grouped=True))
        sections = [main, "## Jobs", markdown_table(report.jobs, report.columns(grouped=False))]
    if report.findings:  # after the main table, over the same rows
        rows = report.variants if report.variants is not None else report.jobs
        columns = (COLUMNS[0], *finding_columns(report.findings, FINDING_METRICS[:1]),
                   MEAN_AUROC_COLUMN)
        sections[1:1] = ["## Test AUROC per finding", markdown_table(rows, columns, keep=columns)]
    body = "\n\n".join(["# Sweep results", *sections, "\n".join(f"- {n}" for n in notes(report)),
                         *differences_section(report)])
    path.write_text(body + "\n")
    return main


def write_csv(jobs: list[dict], path: Path, findings: list[str] = ()) -> None:
    """One row per job with raw values (fractions, not percent), keyed by the result.json names;
    multi-label sweeps: then the per-finding metrics (`test/auroc/<finding>`, ...); then the
    difference from the chosen row (`diff/auroc`, its interval, p, p_holm, verdict; per finding)."""
    columns = (COLUMNS + CONFIG_COLUMNS + finding_columns(findings) + DIFFERENCE_COLUMNS
               + finding_difference_columns(findings))
    intervals = [column.key for column in columns if column.kind in INTERVAL_KINDS]
    header = ["job", "overrides"]
    for column in columns:
        header += [f"{column.key}_low", f"{column.key}_high"] if column.key in intervals else [column.key]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for job in jobs:
            row = {k: ("" if v is None else v) for k, v in job.items()}
            for key in intervals:
                row[f"{key}_low"], row[f"{key}_high"] = job.get(key) or ("", "")
            row["best_val_auroc"] = str(job["best_val_auroc"]).lower()
            writer.writerow(row)


def plot_results(rows: list[dict], path: Path) -> None:
    """The seed's result chart: test accuracy (with its 95% interval) and learning time per row."""
    labels = [r["model"] for r in rows]
    y = np.arange(len(rows))
    accuracy = np.array([100 * number(r["test/acc"]) for r in rows])
    seconds = np.array([number(r["time.train_ms"]) / 1000 for r in rows])
    # spread over seeds for grouped rows; a single job has none
    seconds_std = [getattr(r["time.train_ms"], "std", math.nan) / 1000 for r in rows]
    intervals = [r["test/acc_ci95"] or (math.nan, math.nan) for r in rows]
    errors = np.abs(np.array([[100 * lo, 100 * hi] for lo, hi in intervals]).T - accuracy)
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, sharey=True, figsize=(11, 1.5 + 0.45 * len(rows)))
    # points with intervals, not bars from zero: the seed's variants differ by tenths of a point
    ax_acc.errorbar(accuracy, y, xerr=np.nan_to_num(errors), fmt="o", capsize=3)
    ax_acc.set_xlabel("test accuracy (%) with 95% interval")
    ax_time.barh(y, np.nan_to_num(seconds), xerr=np.nan_to_num(seconds_std), color="tab:gray")
    ax_time.set_xlabel("learning time (s)")
    for i, row in enumerate(rows):
        if row["status"] != OK:
            ax_time.text(0, i, f"  {row['status']}", va="center", color="tab:red")
    ax_acc.set_yticks(y, labels)
    ax_acc.invert_yaxis()  # first job on top, as in the table
    for ax in (ax_acc, ax_time):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("test accuracy and learning time per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    """The seed's per-variant graphs: loss (left axis) and accuracy (right axis) per epoch, one
    panel per row; every seed of a variant is drawn in its panel."""
    columns = min(4, len(rows))
    grid_rows = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(grid_rows, columns, squeeze=False,
                             figsize=(4.2 * columns, 3.2 * grid_rows))
    for ax, row in zip(axes.flat, rows, strict=False):
        ax.set_title(row["model"], fontsize=9)
        jobs = [job for job in row.get("jobs", [row]) if job["history"]]
        if not jobs:  # failed before its first epoch
            ax.text(0.5, 0.5, f"{row['status']}\n{row['error'] or ''}"[:120], ha="center",
                    va="center", wrap=True, color="tab:red", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax_acc = ax.twinx()
        for job in jobs:
            epochs = [h["epoch"] for h in job["history"]]
            alpha = 1.0 if len(jobs) == 1 else 0.6
            for split, color in SPLIT_COLORS:
                ax.plot(epochs, [h[f"{split}/loss"] for h in job["history"]], color=color,
                        alpha=alpha)
                ax_acc.plot(epochs, [h[f"{split}/acc"] for h in job["history"]], color=color,
                            alpha=alpha, linestyle="--")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0, 1)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    legend = [(split, color, style) for style in ("-", "--") for split, color in SPLIT_COLORS]
    fig.legend([Line2D([], [], color=color, linestyle=style) for _, color, style in legend],
               [f"{split} {'loss' if style == '-' else 'acc'}" for split, color, style in legend],
               loc="upper center", ncols=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the legend
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# An evaluation sweep (python -m cxr.evaluate -m checkpoint=A,B data=X,Y): the transfer table


TRANSFER_FILES = ("transfer.md", "transfer.csv")
# each with its 95% interval where result.json has one (the last, comparison only, has none)
TRANSFER_METRICS = ("test/auroc", "test/balanced_acc", "test/ece", "test/balanced_acc_at_target_youden")


@dataclass
class TransferReport:
    jobs: list[dict]  # one row per job: its record's values, and the `trained_on` and `tested_on` it is shown by
    findings: list[str]  # every label the multi-label targets' jobs scored, or named and found absent (n/a)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row["status"] == OK for row in self.jobs)


def transfer_row(job_dir: Path, record: dict) -> dict:
    """One evaluation job's values: the checkpoint and target it names (a job killed before writing
    result.json: its folder's name), its status and metrics."""
    checkpoint, data = record.get("checkpoint") or {}, record.get("data") or {}
    metrics, intervals = record.get("metrics") or {}, record.get("intervals") or {}
    row = {"job": job_dir.name, "status": record.get("status", MISSING), "error": record.get("error"),
           "checkpoint": checkpoint.get("path") or job_dir.name, "sha256": checkpoint.get("sha256"),
           "source": checkpoint.get("trained_on"), "run": checkpoint.get("run"),
           "target": data.get("name") or job_dir.name, "data.root": data.get("root"),
           "split": data.get("split"), "images": data.get("images"), "multilabel": data.get("multilabel"),
           "threshold": record.get("threshold"), "target_threshold": record.get("target_threshold"),
           "pairs": record.get("pairs") or {}, "not_in_target": record.get("not_in_target") or []}
    row.update({key: value for key, value in metrics.items()
                if key in TRANSFER_METRICS or key.startswith("test/auroc/")})
    row.update({f"{key}_ci95": tuple(intervals[key]) for key in TRANSFER_METRICS if intervals.get(key)})
    return row


def name_apart(rows: list[dict], identity, namings, field_name: str) -> None:
    """Set `field_name` of each row to the first of `namings` (row -> name) that tells the rows'
    distinct identities apart; failing all, the identity itself."""
    ids = list(dict.fromkeys(identity(row) for row in rows))
    first = {i: next(row for row in rows if identity(row) == i) for i in ids}
    names = next((names for names in ({i: naming(first[i]) for i in ids} for naming in namings)
                  if len(set(names.values())) == len(ids)), {i: str(i) for i in ids})
    for row in rows:
        row[field_name] = names[identity(row)]


def label_transfer_rows(rows: list[dict]) -> None:
    """Trained on: the training data's name, with the run folder (then the path) where checkpoints
    share it; tested on: the target's name (its root where two targets share a name)."""
    name_apart(rows, lambda r: r["checkpoint"],
               (lambda r: r["source"] or r["checkpoint"], lambda r: f"{r['source']} ({r['run']})"), "trained_on")
    split = {"all": " (all splits)"}
    name_apart(rows, lambda r: (r["target"], r["data.root"], r["split"]),
               (lambda r: f"{r['target']}{split.get(r['split'], '')}",
                lambda r: f"{r['target']}{split.get(r['split'], '')} ({r['data.root']})"), "tested_on")


def build_transfer(jobs: list[tuple[Path, dict]]) -> TransferReport:
    rows = [transfer_row(job_dir, record) for job_dir, record in jobs]
    label_transfer_rows(rows)
    findings = [name for row in rows if row["multilabel"] for name in [*row["pairs"], *row["not_in_target"]]]
    return TransferReport(rows, list(dict.fromkeys(findings)))


def transfer_cell(row: dict) -> str:
    """AUROC [95% interval] / balanced accuracy (%) at the model's threshold / ECE; else the status."""
    if row["status"] != OK:
        return row["status"]
    interval = row.get("test/auroc_ci95")
    auroc = show(row.get("test/auroc"), "auroc") + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
    return f"{auroc} / {show(row.get('test/balanced_acc'), 'percent')} / {show(row.get('test/ece'), 'auroc')}"


def transfer_matrix(report: TransferReport, cell) -> str:
    """Rows: trained on; columns: tested on; each cell `cell(job)` (a pair no job scored: —)."""
    targets = list(dict.fromkeys(row["tested_on"] for row in report.jobs))
    matrix = {}
    for row in report.jobs:
        cells = matrix.setdefault(row["trained_on"], {"trained_on": row["trained_on"], "status": OK})
        cells[row["tested_on"]] = cell(row)
    columns = (Column("Trained on \\ tested on", "trained_on"), *(Column(target, target) for target in targets))
    return markdown_table(list(matrix.values()), columns, keep=columns)


def finding_table(report: TransferReport) -> str:
    """AUROC per label of the multi-label targets' jobs: n/a where the target lacks the label."""
    rows = [{"trained_on": row["trained_on"], "tested_on": row["tested_on"], "status": row["status"],
             **{name: "n/a" if name in row["not_in_target"] else show(row.get(f"test/auroc/{name}"), "auroc")
                for name in report.findings}} for row in report.jobs if row["multilabel"]]
    columns = (Column("Trained on", "trained_on"), Column("Tested on", "tested_on"),
               *(Column(name, name) for name in report.findings))
    return markdown_table(rows, columns, keep=columns)


TRANSFER_NOTES = (
    "Each cell: test AUROC [95% bootstrap interval] / balanced accuracy (%) / ECE (15 equal-width bins) of the "
    "model trained on the row's data, scored on the column's (its test split, or every split where marked). "
    "Decisions use the model's own threshold, chosen on its training data's validation split: what a deployed "
    "model would do on the new data. A drop from the model's own test split is the cost of moving it; a wide "
    "interval, a small target.",
    "Labels are paired by name or by eval.labels (result.json's `pairs`); a multi-label target is scored on the "
    "paired findings only (AUROC: their macro mean). n/a: a label eval.labels names that the target lacks.",
    "AUROC does not depend on the threshold; balanced accuracy does. The second table's threshold is the "
    "target's own best (Youden's J on the target's labels): for comparison only, a deployed model cannot choose "
    "it; the gap between the two says how far the model's threshold has drifted on the new data. ECE: "
    "probabilities that meant one risk on the training data may mean another here.",
)


def write_transfer_markdown(report: TransferReport, path: Path) -> str:
    """transfer.md; returns its main table."""
    main = transfer_matrix(report, transfer_cell)
    at_own = transfer_matrix(report, lambda row: show(row.get("test/balanced_acc_at_target_youden"), "percent")
                             if row["status"] == OK else row["status"])
    sections = ["# Transfer: trained on (rows), tested on (columns)", main,
                "## Balanced accuracy (%) at the target's own threshold (comparison only)", at_own]
    if report.findings:
        sections += ["## Test AUROC per label of the multi-label targets", finding_table(report)]
    failed = [f"- {row['job']}: {row['status']} ({row['error']})" for row in report.jobs if row["status"] != OK]
    sections.append("\n".join(f"- {note}" for note in TRANSFER_NOTES))
    if failed:
        sections += ["## Jobs that did not finish ok", "\n".join(failed)]
    path.write_text("\n\n".join(sections) + "\n")
    return main


def write_transfer_csv(report: TransferReport, path: Path) -> None:
    """One row per job, raw values (fractions), each interval as _low and _high; per label n/a
    where the target lacks it."""
    header = ["job", "trained_on", "tested_on", "checkpoint", "sha256", "data.root", "split", "images", "status",
              "error"]
    for key in TRANSFER_METRICS:
        header += [key, f"{key}_low", f"{key}_high"]
    header += ["threshold", "target_threshold", "pairs", "not_in_target", *(f"test/auroc/{n}" for n in report.findings)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for job in report.jobs:
            row = {key: csv_value(value) for key, value in job.items()}
            for key in TRANSFER_METRICS:
                row[f"{key}_low"], row[f"{key}_high"] = job.get(f"{key}_ci95") or ("", "")
            row["pairs"] = "; ".join(f"{label}={output}" for label, output in job["pairs"].items())
            row.update({f"test/auroc/{name}": "n/a" for name in job["not_in_target"]})
            writer.writerow(row)


def csv_value(value) -> str | float | int:
    """A cell: empty for none, lists (thresholds per finding, labels) joined by spaces and semicolons."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return value


def aggregate_transfer(sweep_dir: Path, jobs: list[tuple[Path, dict]]) -> TransferReport:
    report = build_transfer(jobs)
    markdown, table_csv = (sweep_dir / name for name in TRANSFER_FILES)
    table = write_transfer_markdown(report, markdown)
    write_transfer_csv(report, table_csv)
    report.files = [markdown, table_csv]
    announce(table, report.jobs, report.files)
    return report


def announce(table: str, jobs: list[dict], files: list[Path]) -> None:
    """The report's main table, the jobs that did not finish ok, and where the files are."""
    failed = [job for job in jobs if job["status"] != OK]
    print(f"\n{table}\n")
    if failed:
        print(f"{len(failed)} of {len(jobs)} jobs did not finish ok: "
              + "; ".join(f"{job['job']}: {job['status']} ({job['error']})" for job in failed))
    print("report: " + ", ".join(str(p) for p in files), flush=True)


def aggregate(sweep_dir: str | Path) -> Report | TransferReport:
    """Read every job's result.json under `sweep_dir`, write the report files into it, print the
    table: an evaluation sweep's transfer table (its jobs' result.json say so), else the training
    report. Raises FileNotFoundError when the folder holds no job."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job folders with {RESULT_FILE} under {sweep_dir}")
    if any(results.is_evaluation(record) for _, record in jobs):
        return aggregate_transfer(sweep_dir, jobs)
    report = build_report(jobs)
    rows = report.variants if report.variants is not None else report.jobs
    markdown, table_csv, chart, curves = (sweep_dir / name for name in REPORT_FILES)
    table = write_markdown(report, markdown)
    write_csv(report.jobs, table_csv, report.findings)
    plot_results(rows, chart)
    plot_curves(rows, curves)
    report.files = [markdown, table_csv, chart, curves]
    # TensorBoard's HParams table: what the sweep varied first, the deciding metrics first
    hparams = [result["hparams"] for _, result in jobs if result.get("hparams")]
    if hparams:
        write_experiment(sweep_dir, hparams, [*results.DECIDING_METRICS, "val/loss", "test/loss"])
    announce(table, report.jobs, report.files)
    return report


class AggregateCallback(Callback):
    """Registered in conf/train.yaml (`hydra.callbacks`): the report at the end of each multirun.

    Hydra turns an exception in a callback into a warning and exits 0; SystemExit is not an
    Exception, so raising it after the report is written makes the multirun exit 1 when any job
    failed (cxr.train's task function catches each job's error so that this point is reached).
    """

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = aggregate(sweep_dir)
        except Exception:  # a sweep without its report has failed, whatever Hydra thinks
            log.exception("could not write the report of %s", sweep_dir)
            raise SystemExit(1) from None
        if not report.ok:
            raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr.aggregate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder: outputs/sweeps/<stamp>")
    args = parser.parse_args(argv)
    try:
        report = aggregate(args.sweep_dir)
    except FileNotFoundError as error:
        parser.error(str(error))  # exits 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

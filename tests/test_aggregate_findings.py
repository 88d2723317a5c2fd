"""The sweep report of multi-label runs: a test AUROC per finding in results.md and results.csv.

The result.json files are written by hand through cxr.results (no training), in the layout a
multi-label run writes: `data.multilabel`, `data.classes` = the findings, per-finding metrics
`test/auroc/<finding>` (null where undefined), a threshold per finding, a 2x2 table per finding.
"""

import csv
import subprocess
import sys

import pytest

from cxr import aggregate, results
from tests.conftest import REPO
from tests.test_sweep import read_csv, read_tables

# results.csv's header before multi-label runs existed: single-label sweeps keep it as it is
SINGLE_LABEL_HEADER = [
    "job", "overrides", "model", "model.hidden_layers", "model.dense", "optimizer.lr", "test/acc",
    "time.train_ms", "test/acc_ci95_low", "test/acc_ci95_high", "majority_rate",
    "test/balanced_acc", "test/acc_at_0.5", "val/acc", "val/auroc", "test/auroc",
    "test/sensitivity", "test/specificity", "test/ece", "best_epoch", "stopped_epoch", "epochs", "seed",
    "model.weights", "device", "status", "error", "warning", "best_val_auroc"]
# then every other key that describes a run (cxr.config's `described` keys), in declaration order
CONFIG_HEADER = [
    "model.backbone", "model.dropout", "model.pooling", "model.freeze_backbone", "model.trainable_stages",
    "optimizer.name", "optimizer.weight_decay", "optimizer.momentum", "optimizer.betas", "optimizer.backbone_lr_scale",
    "scheduler.name", "scheduler.warmup_steps", "scheduler.min_lr_scale", "scheduler.step_epochs", "scheduler.gamma",
    "data.name", "data.image_size", "data.window", "data.val_fraction", "data.split_seed", "data.patient_source",
    "data.augment", "data.hflip", "data.limit",
    "trainer.batch_size", "trainer.amp", "trainer.grad_clip", "trainer.accumulate_steps", "trainer.patience",
    "trainer.monitor", "trainer.threshold", "trainer.calibration", "trainer.pos_weight"]
# then the difference from the chosen row (cxr.compare)
DIFFERENCE_HEADER = [
    "compared_with", "diff/auroc", "diff/auroc_ci95_low", "diff/auroc_ci95_high", "diff/balanced_acc",
    "diff/balanced_acc_ci95_low", "diff/balanced_acc_ci95_high", "p", "p_test", "p_holm", "verdict"]
FINDINGS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumonia"]
# (variant, seed) -> per-finding test AUROC; Nodule is absent from one seed's test split (null)
AUROCS = {
    ("resultset1", 0): [0.80, 0.90, 0.70, 0.60],
    ("resultset1", 1): [0.84, 0.86, None, 0.64],
    ("resultset2", 0): [0.70, 0.95, 0.75, 0.50],
    ("resultset2", 1): [0.72, 0.93, 0.65, 0.56],
}


def macro_mean(values) -> float:
    known = [v for v in values if v is not None]
    return sum(known) / len(known)


def multilabel_record(variant: str, seed: int, aurocs: list, findings=FINDINGS) -> dict:
    per_finding = {}
    for name, auroc in zip(findings, aurocs, strict=True):
        per_finding.update({
            f"test/auroc/{name}": auroc, f"val/auroc/{name}": auroc,
            f"test/sensitivity/{name}": None if auroc is None else auroc - 0.1,
            f"test/specificity/{name}": None if auroc is None else auroc + 0.05})
    history = [{"epoch": e, "train/loss": 0.7 - 0.1 * e, "train/acc": 0.6 + 0.1 * e,
                "val/loss": 0.8 - 0.1 * e, "val/acc": 0.5 + 0.1 * e, "val/auroc": 0.8,
                **{f"val/auroc/{name}": 0.8 for name in findings}} for e in (1, 2)]
    return {
        "status": "ok", "error": None, "variant": variant, "seed": seed,
        "overrides": [f"experiment={variant}", f"seed={seed}", "data=nih", "debug=smoke"],
        "model": {"backbone": "resnet50", "dense": 8, "hidden_layers": 1, "weights": "imagenet"},
        "optimizer": {"name": "adam", "lr": 1e-4},
        "data": {"name": "nih", "classes": list(findings), "multilabel": True, "test": 200},
        "metrics": {"val/acc": 0.85, "val/auroc": macro_mean(aurocs), "test/acc": 0.88 + seed / 100,
                    "test/auroc": macro_mean(aurocs), "test/balanced_acc": 0.7,
                    "test/sensitivity": 0.6, "test/specificity": 0.8, "test/acc_at_0.5": 0.86,
                    **per_finding},
        "intervals": {"test/acc": [0.85, 0.91], "test/auroc": [0.6, 0.9],
                      **{f"test/auroc/{name}": None if auroc is None else [auroc - 0.1, auroc]
                         for name, auroc in zip(findings, aurocs, strict=True)}},
        "threshold": [0.3, 0.4, 0.5, 0.6][:len(findings)],
        "confusion": [[[50, 10], [5, 35]] for _ in findings],
        "majority_rate": 0.82,
        "macro_findings": [name for name, auroc in zip(findings, aurocs, strict=True) if auroc is not None],
        "epochs": 2, "best_epoch": 2, "device": "cpu", "history": history, "warnings": [],
        "time": {"train_ms": 1000 * (seed + 1), "total_ms": 1500 * (seed + 1)},
    }


def single_label_record(variant: str, seed: int) -> dict:
    record = multilabel_record(variant, seed, [0.9], findings=["Cardiomegaly"])
    record["data"] = {"name": "chest_xray", "classes": ["NORMAL", "PNEUMONIA"], "multilabel": False,
                      "test": 624}
    record["metrics"] = {key: value for key, value in record["metrics"].items()
                         if key.count("/") == 1}
    record["intervals"] = {"test/acc": [0.85, 0.91]}
    record.update(threshold=0.5, confusion=[[200, 34], [10, 380]], majority_rate=0.625)
    for row in record["history"]:
        del row["val/auroc/" + "Cardiomegaly"]
    return record


def write_sweep(sweep_dir, records: dict) -> None:
    for job, ((variant, seed), record) in enumerate(records.items()):
        job_dir = sweep_dir / f"{job}_experiment={variant},seed={seed}"
        job_dir.mkdir(parents=True)
        results.write(job_dir, record)


@pytest.fixture
def multilabel_sweep(tmp_path):
    write_sweep(tmp_path, {key: multilabel_record(*key, aurocs) for key, aurocs in AUROCS.items()})
    return tmp_path


def test_results_md_has_a_test_auroc_table_per_finding_over_the_variants(multilabel_sweep):
    report = aggregate.aggregate(multilabel_sweep)

    assert report.ok and report.findings == FINDINGS
    text = (multilabel_sweep / "results.md").read_text()
    assert "## Test AUROC per finding" in text
    assert aggregate.MULTILABEL_NOTE in text and "label-wise accuracy" in aggregate.MULTILABEL_NOTE
    # the findings the macro intervals average over, as each job's result.json states them
    assert "the same ones in every bootstrap resample: Cardiomegaly, Effusion, Nodule, Pneumonia; " \
           "Cardiomegaly, Effusion, Pneumonia." in text
    # single-label images are one decision each; a multi-label image holds several
    assert "One test image" not in text
    variants, per_finding, jobs, *differences = read_tables(multilabel_sweep / "results.md")
    assert [row["Model"] for row in variants] == ["resultset1", "resultset2"]
    assert list(per_finding[0]) == ["Model", *FINDINGS, "Mean"]
    assert [row["Model"] for row in per_finding] == ["resultset1", "resultset2"]
    # means over the two seeds, worked by hand; resultset1's Nodule has one seed only, no std
    assert per_finding[0] == {"Model": "resultset1", "Cardiomegaly": "0.820 ± 0.028",
                              "Effusion": "0.880 ± 0.028", "Nodule": "0.700",
                              "Pneumonia": "0.620 ± 0.028",
                              # seed 0: 3.0 / 4 = 0.75; seed 1: 2.34 / 3 = 0.78 -> 0.765
                              "Mean": "0.765 ± 0.021"}
    assert per_finding[1] == {"Model": "resultset2", "Cardiomegaly": "0.710 ± 0.014",
                              "Effusion": "0.940 ± 0.014", "Nodule": "0.700 ± 0.071",
                              "Pneumonia": "0.530 ± 0.042",
                              # seed 0: 2.9 / 4 = 0.725; seed 1: 2.86 / 4 = 0.715 -> 0.72
                              "Mean": "0.720 ± 0.007"}
    # the best of each column is bold, as in the main table; Nodule ties at 0.700
    bold = [line for line in text.splitlines() if line.startswith("| resultset")][2:4]
    assert "**0.820 ± 0.028**" in bold[0] and "**0.940 ± 0.014**" in bold[1]
    assert "**0.700**" in bold[0] and "**0.700 ± 0.071**" in bold[1]
    assert "**0.765 ± 0.021**" in bold[0] and "**0.720" not in bold[1]
    assert len(jobs) == 4
    # the main table's Test AUROC is the run's own macro mean, averaged over the seeds
    assert variants[0]["Test AUROC"] == "0.765 ± 0.021"


def test_results_csv_has_the_per_finding_columns_after_the_others(multilabel_sweep):
    aggregate.aggregate(multilabel_sweep)

    with (multilabel_sweep / "results.csv").open(newline="") as f:
        header = next(csv.reader(f))
    extra = [f"{metric}/{name}" for metric in ("test/auroc", "test/sensitivity", "test/specificity")
             for name in FINDINGS]
    differences = [f"{key}/{name}" for key in ("diff/auroc", "p", "p_holm") for name in FINDINGS]
    assert header == SINGLE_LABEL_HEADER + CONFIG_HEADER + extra + DIFFERENCE_HEADER + differences
    rows = read_csv(multilabel_sweep / "results.csv")
    assert [row["seed"] for row in rows] == ["0", "1", "0", "1"]
    assert float(rows[2]["test/auroc/Nodule"]) == pytest.approx(0.75)
    assert float(rows[3]["test/sensitivity/Pneumonia"]) == pytest.approx(0.46)
    assert float(rows[0]["test/specificity/Effusion"]) == pytest.approx(0.95)
    assert rows[1]["test/auroc/Nodule"] == "" and rows[1]["test/sensitivity/Nodule"] == ""


def single_label_header(sweep_dir) -> list[str]:
    """results.csv's header of a single-label sweep of the same shape."""
    write_sweep(sweep_dir, {key: single_label_record(*key) for key in AUROCS})
    aggregate.aggregate(sweep_dir)
    with (sweep_dir / "results.csv").open(newline="") as f:
        return next(csv.reader(f))


def test_a_single_label_sweep_has_no_per_finding_table_or_columns(tmp_path):
    header = single_label_header(tmp_path)

    assert header == SINGLE_LABEL_HEADER + CONFIG_HEADER + DIFFERENCE_HEADER
    text = (tmp_path / "results.md").read_text()
    assert "per finding" not in text and "label-wise" not in text
    assert len(read_tables(tmp_path / "results.md")) == 4  # variants, jobs, differences, over seeds
    assert "One test image is 100/N = 0.16 points (N = 624)" in text


def test_a_finding_undefined_everywhere_shows_a_dash_in_its_column(tmp_path):
    # a sweep of single jobs (no repeated seeds): the table's rows are the jobs
    records = {("resultset1", 0): multilabel_record("resultset1", 0, [0.8, None, 0.6, 0.7]),
               ("resultset2", 0): multilabel_record("resultset2", 0, [0.9, None, 0.5, 0.6])}
    write_sweep(tmp_path, records)

    aggregate.aggregate(tmp_path)

    main, per_finding, *differences = read_tables(tmp_path / "results.md")
    assert [row["Model"] for row in per_finding] == [row["Model"] for row in main]
    assert [row["Effusion"] for row in per_finding] == ["—", "—"]
    assert [row["Cardiomegaly"] for row in per_finding] == ["0.800", "0.900"]
    assert [row["Mean"] for row in per_finding] == ["0.700", "0.667"]


def test_a_mixed_sweep_and_a_failed_job_do_not_break_the_report(tmp_path):
    records = {("resultset1", 0): single_label_record("resultset1", 0),
               ("resultset2", 0): multilabel_record("resultset2", 0, [0.8, 0.9, 0.6, 0.7]),
               # another multi-label data set: the findings are the union, in order of appearance
               ("resultset3", 0): multilabel_record("resultset3", 0, [0.7, 0.8],
                                                    findings=["Effusion", "Edema"]),
               ("resultset4", 0): {"status": "failed", "error": "CUDA out of memory",
                                   "overrides": ["experiment=resultset4", "seed=0"], "metrics": {}}}
    write_sweep(tmp_path, records)

    report = aggregate.aggregate(tmp_path)

    assert not report.ok and report.findings == [*FINDINGS, "Edema"]
    main, per_finding, *differences = read_tables(tmp_path / "results.md")
    assert [row["Status"] for row in main] == ["ok", "ok", "ok", "failed"]
    assert list(per_finding[0]) == ["Model", *FINDINGS, "Edema", "Mean"]
    assert per_finding[0]["Cardiomegaly"] == "—" and per_finding[0]["Mean"] == "0.900"
    assert (per_finding[2]["Effusion"], per_finding[2]["Edema"]) == ("0.700", "0.800")
    assert per_finding[3]["Mean"] == "—"
    rows = read_csv(tmp_path / "results.csv")
    assert [row["test/auroc/Edema"] for row in rows] == ["", "", "0.8", ""]


@pytest.mark.slow  # a subprocess; the multi-label sweep test runs the same report through Hydra's callback
def test_the_cli_reports_a_multilabel_sweep(multilabel_sweep):
    done = subprocess.run([sys.executable, "-m", "cxr.aggregate", str(multilabel_sweep)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "| Model" in done.stdout
    tables = read_tables(multilabel_sweep / "results.md")
    assert [row["Effusion"] for row in tables[1]] == ["0.880 ± 0.028", "0.940 ± 0.014"]
    assert (multilabel_sweep / "curves.png").stat().st_size > 0

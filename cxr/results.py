"""result.json, the one record of a run that other tools read, and the predictions CSV files.

This module is the only one that knows result.json's name and layout: `train.py` builds records
through it, `aggregate.py` reads them through it. A record's status is one of

    ok            finished: metrics of the best validation epoch, the test split once
    failed        stopped by an error (`error` holds one line; the log has the rest)
    interrupted   stopped by a signal; last.pt is kept and the run can be resumed

The metric names are the same in result.json, TensorBoard and the report: `<split>/<metric>`.

Per-image predictions share one CSV layout, whose columns the task gives (cxr.task:
`path, prob_<class>..., label[, truth], status`; multi-label: a probability per finding, the label
the findings called joined by |, and `truth_<finding>` 1, 0 or empty for unknown), written by
cxr.predict (predictions.csv) and by each run for its test split (test_predictions.csv, with the
truth, from the checkpoint and threshold chosen on validation).
"""

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cxr.config import description
from cxr.data import label_counts
from cxr.files import atomic_write

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "test_predictions.csv"
OK, FAILED, INTERRUPTED = "ok", "failed", "interrupted"
# the metrics of a split (cxr.task's `metrics` gives all but loss; the last five: cxr.calibration)
CALIBRATION_METRICS = ("ece", "ece_quantile", "ece_classwise", "brier", "nll")
METRICS = ("loss", "acc", "balanced_acc", "auroc", "sensitivity", "specificity", "precision", "f1",
           *CALIBRATION_METRICS)
# result.json's `kind` of a cxr.evaluate run (a model of cxr.train on other data); training runs have none
EVALUATION = "evaluation"
# shown first in TensorBoard's HParams table (and used to choose: validation decides, test reports)
DECIDING_METRICS = ("val/auroc", "test/auroc", "test/balanced_acc", "test/acc", "val/acc",
                    "test/sensitivity", "test/specificity")


def new_record(cfg, overrides) -> dict:
    """The parts of result.json known before training (also written for failed runs): what
    describes the run (cxr.config's `described` keys, by section: model, optimizer, ...)."""
    record = {"status": None, "error": None, "variant": cfg.variant, "description": cfg.description,
              "overrides": list(overrides)}
    for key, value in description(cfg).items():
        section, _, name = key.rpartition(".")
        if section:
            record.setdefault(section, {})[name] = value
        else:
            record[name] = value
    record.update({
        # stopped_epoch: the last epoch trained when trainer.patience stopped the run early, else null
        "metrics": {}, "epochs": cfg.trainer.epochs, "best_epoch": None, "stopped_epoch": None,
        "device": None, "warnings": [], "time": {},
        # MiB on its GPU (null off CUDA; cxr.runtime.gpu_memory_mb): peak_allocated (its tensors),
        # peak_reserved (the caching allocator's), cuda_context_estimate (outside the allocator);
        # a packed job needs peak_reserved + cuda_context_estimate
        "gpu_memory_mb": None,
    })
    return record


def data_summary(dataset) -> dict:
    """Classes (or findings), split sizes, skipped files, how patients were told (cxr.data.splits);
    multi-label: each split's count of positive, negative and unknown labels per finding (what
    data.uncertain and data.blank change)."""
    task = dataset.task
    summary = {"classes": dataset.classes, "task": task.kind, "multilabel": task.multilabel,
               "train": len(dataset.train), "val": len(dataset.val), "test": len(dataset.test),
               "skipped_files": len(dataset.skipped), "skipped": dataset.skipped, "root": str(dataset.root),
               "patients": dataset.patients}
    if task.multilabel:
        summary["label_counts"] = {name: label_counts(split, dataset.classes) for name, split in
                                   (("train", dataset.train), ("val", dataset.val), ("test", dataset.test))}
    return summary


def split_metrics(split: str, loss: float, metrics: dict) -> dict:
    """{"<split>/loss": ..., "<split>/acc": ...} from a loss and cxr.metrics' scalar metrics, the
    per-finding ones (`<split>/auroc/<finding>`) after the means."""
    names = [name for name in METRICS if name in metrics]
    names += [name for name in metrics if "/" in name and name.split("/")[0] in METRICS]
    return {f"{split}/loss": loss, **{f"{split}/{name}": metrics[name] for name in names}}


def tested(task, labels, probs, threshold, loss: float, resamples: int) -> dict:
    """What result.json reports of a test split scored at `threshold` (chosen on validation): its
    `test/...` metrics (calibration included: cxr.task's `metrics`), their bootstrap intervals,
    the confusion matrix, the majority rate, the findings a macro mean averages (multi-label), and
    the warnings of a result that means nothing. One function for every tool that tests a model
    (cxr.train, cxr.evaluate); `probs` are already calibrated where the model was (best.pt's
    temperature through Task.probabilities)."""
    return {
        "threshold": threshold,
        "metrics": {**split_metrics("test", loss, task.metrics(labels, probs, threshold)),
                    **at_reference_threshold(task.metrics(labels, probs, task.reference_threshold))},
        "intervals": {f"test/{k}": v for k, v in task.intervals(labels, probs, threshold, resamples, seed=0).items()},
        "confusion": task.confusion(labels, probs, threshold), "majority_rate": task.majority_rate(labels),
        "macro_findings": task.macro_findings(labels), "warnings": task.warnings(labels, probs, threshold),
    }


def calibration_record(method: str, temperature, before: dict, after: dict) -> dict:
    """result.json's `calibration`: trainer.calibration, the temperature fitted (null for none;
    multi-label: one per finding), and the val/ and test/ calibration metrics and AUROC before and
    after it (`before`, `after`: split metrics as `split_metrics` names them), so that a reader
    sees what calibration changed and that the ranking did not change."""
    shown = ("loss", "auroc", *CALIBRATION_METRICS)

    def kept(values: dict) -> dict:
        return {key: value for key, value in values.items() if key.split("/")[1] in shown}

    return {"method": method, "temperature": temperature, "before": kept(before), "after": kept(after)}


def at_reference_threshold(metrics: dict) -> dict:
    """Test accuracy and balanced accuracy at the reference's fixed 0.5 threshold, reported beside
    those at the threshold chosen on validation, so that its table can still be compared."""
    return {"test/acc_at_0.5": metrics["acc"], "test/balanced_acc_at_0.5": metrics["balanced_acc"]}


def at_target_threshold(metrics: dict) -> dict:
    """An evaluation's balanced accuracy, sensitivity and specificity at the target's own best
    threshold (Youden's J on the target's labels), for comparison only: a deployed model decides at
    its source's threshold, and cannot choose one on labels it has not got."""
    return {f"test/{name}_at_target_youden": metrics[name] for name in ("balanced_acc", "sensitivity", "specificity")}


def evaluation_record(cfg, overrides, checkpoint: dict) -> dict:
    """The parts of a cxr.evaluate result.json known before scoring (also written when it fails):
    the checkpoint's identity (cxr.checkpoint.identity; its path alone when it could not be read),
    the target data and the label pairs asked for."""
    labels = OmegaConf.select(cfg, "eval.labels")
    return {"status": None, "error": None, "kind": EVALUATION, "overrides": list(overrides), "checkpoint": checkpoint,
            "data": {key: OmegaConf.select(cfg, f"data.{key}") for key in ("name", "layout", "root")}
            | {"split": OmegaConf.select(cfg, "eval.split")},
            "labels": OmegaConf.to_container(labels) if OmegaConf.is_config(labels) else labels,
            "metrics": {}, "device": None, "warnings": [], "time": {}}


def is_evaluation(record: dict) -> bool:
    return record.get("kind") == EVALUATION


def epoch_row(epoch: int, train: dict, val_loss: float, val_metrics: dict) -> dict:
    """One row of the history: the epoch's training loss/accuracy and its validation metrics."""
    return {"epoch": epoch, "train/loss": train["loss"], "train/acc": train["acc"],
            **split_metrics("val", val_loss, val_metrics)}


def failure_record(cfg, overrides, status: str, message: str) -> dict:
    try:
        record = new_record(cfg, overrides)
    except Exception:  # the config itself is broken (a missing mandatory value, say)
        record = {"overrides": list(overrides), "metrics": {}}
    record.update(status=status, error=message)
    return record


def write(output_dir: str | os.PathLike, record: dict) -> None:
    text = json.dumps(_json_safe(record), indent=2) + "\n"
    atomic_write(Path(output_dir) / RESULT_FILE, lambda f: f.write(text.encode()))


def read(output_dir: str | os.PathLike) -> dict | None:
    """The record in `output_dir`, or None when there is none (or it is not readable JSON)."""
    path = Path(output_dir) / RESULT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def flat(record: dict) -> dict:
    """The record's values by their contract names: `model.dense`, `optimizer.lr`, `test/acc`,
    `time.train_ms`, ... (what the aggregator's columns are keyed by)."""
    values = {key: value for key, value in record.items() if not isinstance(value, dict)}
    for section in ("model", "optimizer", "scheduler", "data", "trainer", "time"):
        for key, value in (record.get(section) or {}).items():
            values[f"{section}.{key}"] = value
    values.update(record.get("metrics") or {})
    for key, interval in (record.get("intervals") or {}).items():
        values[f"{key}_ci95"] = tuple(interval) if interval else None
    return values


def write_predictions(rows: list[dict], columns: list[str], output: str | os.PathLike) -> None:
    """The rows (cxr.task's prediction columns) as CSV; a file that could not be read is a row with
    status `unreadable` and nothing else."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_test_predictions(output_dir: str | os.PathLike, paths: list[str], probs: np.ndarray, labels: np.ndarray,
                           threshold, task) -> None:
    """test_predictions.csv: each image's probabilities, decision at `threshold` and truth (cxr.task's columns)."""
    decisions = task.decide(probs, threshold)
    rows = [task.prediction_row(path, p, d, truth=y) for path, p, d, y in zip(paths, probs, decisions, labels,
                                                                               strict=True)]
    write_predictions(rows, task.prediction_columns(with_truth=True), Path(output_dir) / PREDICTIONS_FILE)


def read_predictions(path: str | os.PathLike, task) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A test predictions CSV (`write_predictions`, with truth) back as the paths, the
    probabilities (N, C) in float32 as the run held them, and the labels as the run's split held
    them (cxr.task: class indices, or (N, K) of 1, 0, -1). Rows that are not ok are left out."""
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["status"] == "ok"]
    probs = np.array([[float(row[f"prob_{name}"]) for name in task.classes] for row in rows], dtype=np.float32)
    labels = np.array([task.truth_of_row(row) for row in rows], dtype=np.int64)
    return [row["path"] for row in rows], probs.reshape(len(rows), len(task.classes)), labels


def _json_safe(value):
    """NaN (e.g. AUROC on a one-class split) is not JSON: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):  # JSON arrays
        return [_json_safe(v) for v in value]
    return value

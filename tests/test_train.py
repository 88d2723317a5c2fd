"""End-to-end: real tiny trainings on CPU, read back from the files they wrote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cxr import aggregate, results
from cxr.train import run, run_safely
from tests.conftest import REPO
from tests.test_sweep import hparams_of, read_csv

EPOCH_TAGS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/auroc")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, make_cfg):
    out = tmp_path_factory.mktemp("run")
    result = run(make_cfg("debug=smoke"), out, overrides=["debug=smoke"])
    return out, result


def test_result_json_follows_the_contract(smoke_run):
    """The config summary as composed, and every test number recomputed by scikit-learn from
    test_predictions.csv, whose rows are checked against the dataset folder on disk."""
    out, _ = smoke_run
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["error"] is None
    assert result["overrides"] == ["debug=smoke"]
    assert result["model"] == {"backbone": "resnet50", "dense": 8, "hidden_layers": 1, "dropout": 0.5,
                               "pooling": "flatten", "weights": None, "freeze_backbone": False,
                               "trainable_stages": None}
    assert result["optimizer"] == {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "momentum": 0.9,
                                   "betas": [0.9, 0.999], "backbone_lr_scale": 1.0}
    assert result["scheduler"] == {"name": "none", "warmup_steps": 0, "min_lr_scale": 0.0, "step_epochs": 10,
                                   "gamma": 0.1}
    assert result["stopped_epoch"] is None and result["epochs"] == 2 and len(result["history"]) == 2
    assert result["time"]["train_ms"] > 0 and result["time"]["total_ms"] >= result["time"]["train_ms"]
    assert result["device"].startswith("cpu") and result["gpu_memory_mb"] is None  # CUDA only
    check_counts_against_the_folder(result, read_csv(out / "test_predictions.csv"))
    check_test_metrics_against_sklearn(result, read_csv(out / "test_predictions.csv"))


def check_counts_against_the_folder(result: dict, rows: list[dict]) -> None:
    """debug=smoke keeps at most 64 images per split: train/ holds 720 (train and validation are
    carved from it), test/ 240, all readable. Every test row is a file of test/<its truth>/."""
    data, root = result["data"], Path(result["data"]["root"])
    on_disk = {split: sorted(root.glob(f"{split}/*/*.jpeg")) for split in ("train", "test")}
    assert data["name"] == "synthetic" and data["image_size"] == 32 and data["skipped_files"] == 0
    assert len(on_disk["train"]) == 720 and len(on_disk["test"]) == 240
    assert data["train"] == data["val"] == data["test"] == 64 == len(rows)
    test_files = {str(path): path.parent.name for path in on_disk["test"]}
    assert all(test_files[row["path"]] == row["truth"] for row in rows)
    assert len({row["path"] for row in rows}) == 64


def check_test_metrics_against_sklearn(result: dict, rows: list[dict]) -> None:
    truth = np.array([row["truth"] == "PNEUMONIA" for row in rows])
    p = np.array([float(row["prob_PNEUMONIA"]) for row in rows])
    called = np.array([row["label"] == "PNEUMONIA" for row in rows])
    assert np.array_equal(called, p >= result["threshold"])  # the validation's threshold, applied
    expected = {"test/acc": accuracy_score(truth, called), "test/balanced_acc": balanced_accuracy_score(truth, called),
                "test/auroc": roc_auc_score(truth, p), "test/sensitivity": recall_score(truth, called),
                "test/specificity": recall_score(~truth, ~called), "test/f1": f1_score(truth, called),
                "test/precision": precision_score(truth, called, zero_division=np.nan),
                "test/loss": log_loss(truth, p, labels=[False, True]),
                "test/acc_at_0.5": accuracy_score(truth, p >= 0.5)}
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert result["confusion"] == confusion_matrix(truth, called).tolist()
    assert result["majority_rate"] == max(truth.mean(), 1 - truth.mean())


def test_tensorboard_has_every_epoch_and_test_once(smoke_run):
    out, result = smoke_run
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in EPOCH_TAGS:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    test_acc = events.Scalars("test/acc")
    assert len(test_acc) == 1
    assert test_acc[0].value == pytest.approx(result["metrics"]["test/acc"])
    assert "test/auroc" in tags
    assert "inputs/train" in events.Tags()["images"]


def test_checkpoints_load_with_weights_only(smoke_run):
    out, result = smoke_run
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == result["best_epoch"]
    assert best["task"] == {"kind": "binary", "classes": ["NORMAL", "PNEUMONIA"]}
    # a run that ended ok needs best.pt only: last.pt (weights + optimizer state) is removed
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt"]


def test_corrupt_and_zero_byte_images_are_skipped_and_counted(make_cfg, tmp_path, embedded_root):
    root = tmp_path / "data"
    source = embedded_root
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            (root / split / label).mkdir(parents=True)
            for f in sorted((source / split / label).iterdir())[:20]:
                shutil.copy(f, root / split / label / f.name)
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"")
    good = sorted((root / "train" / "PNEUMONIA").iterdir())[0].read_bytes()
    (root / "train" / "PNEUMONIA" / "person9999_virus_1.jpeg").write_bytes(good[: len(good) // 3])
    cfg = make_cfg("debug=smoke", "data=chest_xray", f"data.root={root}", "model.weights=null",
                   "data.image_size=32", "trainer.epochs=1", "data.limit=null")
    result = run(cfg, tmp_path / "out")
    assert result["status"] == "ok"
    assert result["data"]["skipped_files"] == 2
    assert sorted(os.path.basename(p) for p in result["data"]["skipped"]) == [
        "IM-9999-0001.jpeg", "person9999_virus_1.jpeg"]


def test_missing_root_is_one_line_and_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cxr.train", "data=chest_xray", "data.root=/nonexistent",
                           "model.weights=null", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "/nonexistent" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_typo_fails_at_compose_time_without_running(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cxr.train", "model.dens=8", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "dens" in proc.stderr and not (tmp_path / "result.json").exists()


def test_invalid_value_fails_before_any_work(make_cfg, tmp_path):
    result = run_safely(make_cfg("debug=smoke", "model.dense=0"), tmp_path, ["model.dense=0"])
    assert result["status"] == "failed" and "model.dense" in result["error"]
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("events*"))


@pytest.mark.slow
def test_real_images_from_scratch_at_64px(shared_data, make_cfg, tmp_path):
    # ResNet18: the whole network learns from scratch as ResNet50 does, in a third of the time
    cfg = make_cfg("data=chest_xray", f"data.root={shared_data / 'cxr-real'}", "model=resnet18",
                   "model.weights=null", "data.image_size=64", "trainer.epochs=4", "optimizer.lr=1e-4",
                   "trainer.progress=false")
    result = run(cfg, tmp_path)
    print(result["metrics"]["test/auroc"])
    assert result["metrics"]["test/auroc"] >= 0.85


def test_without_the_real_radiographs_ci_fails_where_a_developer_skips(tmp_path):
    """A test of the real images (the `shared_data` fixture) with CXR_SHARED_DATA unset: skipped
    on a developer's machine, failed under CI=true (so CI cannot pass without those tests)."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("from tests.conftest import shared_data  # noqa: F401\n\n\n"
                     "def test_probe(shared_data):\n    pass\n")
    env = {key: value for key, value in os.environ.items() if key not in ("CXR_SHARED_DATA", "CI")}
    for ci, exit_code, outcome in (("true", 1, "1 error"), ("", 0, "1 skipped")):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                              cwd=tmp_path, env={**env, "CI": ci, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == exit_code and outcome in done.stdout, done.stdout[-2000:]
        assert ("CI=true: the real-radiograph tests must run" in done.stdout) == (ci == "true")


def same(found, value) -> bool:
    """A value as result.json or a CSV cell holds it, and as HParams shows it (numbers as floats,
    None and lists as text)."""
    if isinstance(value, float) and not isinstance(value, bool):
        return float(found) == pytest.approx(value)
    return str(found) == str(value) or (value == "None" and found in ("", None, "null"))  # null: Hydra's spelling


def test_what_describes_a_run_is_one_list_in_result_json_hparams_and_the_report(smoke_run, tmp_path):
    """result.json's config summary, TensorBoard's HParams and the report's CSV columns name the
    same keys with the same values (they were four hand-written lists that disagreed:
    optimizer.weight_decay and the scheduler were in none of the first three)."""
    out, result = smoke_run
    hparams = hparams_of(out)  # TensorBoard's own reader
    in_record = results.flat(result)
    job = tmp_path / "sweep" / "0_debug=smoke"
    job.mkdir(parents=True)
    shutil.copy(out / "result.json", job / "result.json")
    aggregate.aggregate(tmp_path / "sweep")
    (row,) = read_csv(tmp_path / "sweep" / "results.csv")
    for key, value in hparams.items():
        shown = {"variant": "model", "trainer.epochs": "epochs"}.get(key, key)  # the report's names for them
        for where, found in (("result.json", in_record[key]), ("results.csv", row[shown])):
            assert same(found, value), (key, where, found, value)
    for key in ("optimizer.weight_decay", "optimizer.betas", "scheduler.name", "scheduler.warmup_steps",
                "data.augment", "trainer.batch_size"):
        assert key in hparams, key

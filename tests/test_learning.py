"""What the main job and the documented recipes learn, run as a user runs them (slow: minutes).

The embedded data's table must show learning in every variant, not only the machinery; on real
radiographs the decisions must respect the 1:3 class imbalance. Metrics are recomputed here with
scikit-learn from the per-image predictions the runs wrote, so a wrong metric in cxr cannot pass.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scores(predictions: list[dict]) -> tuple[float, float]:
    """(AUROC, balanced accuracy) of per-image predictions with a `truth` column."""
    truth = [row["truth"] == "PNEUMONIA" for row in predictions]
    auroc = roc_auc_score(truth, [float(row["prob_PNEUMONIA"]) for row in predictions])
    balanced = balanced_accuracy_score(truth, [row["label"] == "PNEUMONIA" for row in predictions])
    return auroc, balanced


def test_the_default_run_learns_for_seeds_0_1_2(tmp_path):
    """`python -m cxr.train` (the embedded data's defaults) with three seeds."""
    done = subprocess.run([sys.executable, "-m", "cxr.train", "-m", "seed=0,1,2", "trainer.progress=false",
                           f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = sorted(p.parent for p in tmp_path.glob("*/result.json"))
    assert len(jobs) == 3
    for job in jobs:
        auroc, balanced = scores(read_csv(job / "test_predictions.csv"))
        assert auroc >= 0.90 and balanced >= 0.80, (job.name, auroc, balanced)
        assert json.loads((job / "result.json").read_text())["metrics"]["test/auroc"] == pytest.approx(auroc)


def test_make_sweep_every_variant_learns_and_the_sweep_stays_small(tmp_path):
    """The main job, as the README runs it: seven rows, each clearly above chance, and no more
    than 300 MB on disk (finished runs keep best.pt only: a head and a backbone reference)."""
    done = subprocess.run(["make", "sweep", f"ARGS=trainer.progress=false hydra.sweep.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_csv(tmp_path / "results.csv")
    assert sorted(row["model"] for row in rows) == [f"resultset{k}" for k in range(1, 8)]
    for row in rows:
        auroc, balanced = scores(read_csv(tmp_path / row["job"] / "test_predictions.csv"))
        assert balanced >= 0.70, (row["model"], balanced)
        assert float(row["test/balanced_acc"]) == pytest.approx(balanced)
    assert not list(tmp_path.rglob("last.pt"))
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert size <= 300e6, f"{size / 1e6:.0f} MB"


def test_real_radiographs_decisions_respect_the_imbalance(shared_data, tmp_path):
    """cxr-real (Kaggle images, patient-disjoint splits, 1:3 NORMAL:PNEUMONIA) with data=chest_xray's
    defaults (threshold chosen on validation) and the offline recipe of the embedded data: its test
    split in the run, and the same patients' images through cxr.predict."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cxr.train", "data=chest_xray",
                           f"data.root={shared_data / 'cxr-real'}", "model.weights=null",
                           "model.freeze_backbone=true", "data.image_size=64", "trainer.epochs=50",
                           "trainer.progress=false", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    auroc, balanced = scores(read_csv(run_dir / "test_predictions.csv"))
    assert auroc >= 0.90 and balanced >= 0.75, (auroc, balanced)

    output = tmp_path / "predictions.csv"
    done = subprocess.run([sys.executable, "-m", "cxr.predict", f"checkpoint={run_dir / 'best.pt'}",
                           f"inputs={shared_data / 'cxr-real' / 'test'}", f"output={output}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [{**row, "truth": Path(row["path"]).parent.name} for row in read_csv(output)]
    assert len(rows) == 312 and all(row["status"] == "ok" for row in rows)
    auroc, balanced = scores(rows)
    assert auroc >= 0.90 and balanced >= 0.75, (auroc, balanced)

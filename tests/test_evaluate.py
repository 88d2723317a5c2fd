"""`python -m cxr.evaluate` on models trained here: the scores against the training run's own and
against predict's probabilities on the same files (scikit-learn's AUROC as the oracle), a binary
model on a multi-label layout, the one-line failures, and the transfer table the aggregator writes
from evaluation jobs' result.json files."""

import csv
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr import aggregate
from cxr.checkpoint import load_classifier
from cxr.config import CONF_DIR
from cxr.evaluate import run_safely
from cxr.pixels import read_picture
from cxr.predict import classify
from cxr.train import run
from tests.conftest import REPO

SMOKE = ("debug=smoke", "data.limit=32", "trainer.epochs=1", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
EVAL = ("trainer.device=cpu", "trainer.bootstrap=20", "trainer.progress=false")


def evaluate_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=[*EVAL, *overrides])


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(make_cfg, tmp_path_factory):
    """A debug=smoke run on the embedded data (32 px, the whole network): its folder and result."""
    out = tmp_path_factory.mktemp("run")
    result = run(make_cfg(*SMOKE), out, list(SMOKE))
    assert result["status"] == "ok"
    return out, result


def test_the_training_data_gives_the_runs_own_test_metrics(trained, tmp_path, caplog):
    out, result = trained
    with caplog.at_level(logging.INFO, logger="cxr.evaluate"):
        record = run_safely(evaluate_cfg(f"checkpoint={out}", "data.limit=32"), tmp_path, ["x"])
    assert record["status"] == "ok" and json.loads((tmp_path / "result.json").read_text())["status"] == "ok"
    assert "decoding at the checkpoint's data.image_size=32, not the data config's 64" in caplog.text
    assert record["data"]["image_size"] == 32 and record["data"]["images"] == result["data"]["test"]
    checkpoint = record["checkpoint"]
    assert checkpoint["sha256"] == hashlib.sha256((out / "best.pt").read_bytes()).hexdigest()
    assert (checkpoint["trained_on"], checkpoint["run"], checkpoint["path"]) == ("synthetic", out.name,
                                                                                 str(out / "best.pt"))
    own = {key for key in result["metrics"] if key.startswith("test/")}
    assert own <= set(record["metrics"]) and set(record["intervals"]) >= {"test/auroc", "test/ece", "test/brier"}
    assert record["metrics"]["test/auroc"] == pytest.approx(result["metrics"]["test/auroc"], abs=1e-9)
    assert record["confusion"] == result["confusion"] and record["threshold"] == result["threshold"]
    rows = read_rows(tmp_path / "test_predictions.csv")
    assert [row["path"] for row in rows] == [row["path"] for row in read_rows(out / "test_predictions.csv")]
    truth, scores = [row["truth"] == "PNEUMONIA" for row in rows], [float(row["prob_PNEUMONIA"]) for row in rows]
    assert record["metrics"]["test/auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
    # the target's own threshold, beside the model's for comparison only
    assert 0 <= record["metrics"]["test/balanced_acc_at_target_youden"] <= 1 and record["target_threshold"] is not None


def nih_layout(root: Path, pictures: list[tuple[Path, str, str]]) -> dict[str, str]:
    """(image, class, split) as NIH ChestX-ray14 lays them out: images_001/images/<n>.png (PNG only:
    the layout's images; each picture as cxr.pixels reads it, saved losslessly), Data_Entry_2017.csv
    (PNEUMONIA -> Pneumonia, every third image also Effusion, a finding no Kaggle model has), the
    test split in test_list.txt. {image: its PNG}."""
    (root / "images_001" / "images").mkdir(parents=True)
    lines, test, written = ["Image Index,Finding Labels,Follow-up #,Patient ID"], [], {}
    for k, (image, label, split) in enumerate(pictures):
        name = f"{k:08d}_000.png"
        Image.fromarray(read_picture(str(image))).save(root / "images_001" / "images" / name)
        findings = ["Pneumonia"] * (label == "PNEUMONIA") + ["Effusion"] * (k % 3 == 0)
        lines.append(f"{name},{'|'.join(findings) or 'No Finding'},0,{k}")
        test += [name] * (split == "test")
        written[str(image)] = str(root / "images_001" / "images" / name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return written


def test_a_binary_model_scores_a_multilabel_layouts_pneumonia(trained, embedded_root, tmp_path):
    """The run's test pictures in NIH's layout: the model's P(PNEUMONIA) scores Pneumonia (not
    Effusion), as cxr.predict computes it on the same files."""
    out, _ = trained
    tested = [(Path(row["path"]), row["truth"], "test") for row in read_rows(out / "test_predictions.csv")]
    train = [(path, "NORMAL", "train") for path in sorted((embedded_root / "train" / "NORMAL").iterdir())[:4]]
    pngs = nih_layout(tmp_path / "nih", tested + train)
    record = run_safely(evaluate_cfg(f"checkpoint={out}", "data=nih", f"data.root={tmp_path / 'nih'}",
                                     "labels=pneumonia"), tmp_path / "eval", [])
    assert record["status"] == "ok", record["error"]
    assert record["pairs"] == {"Pneumonia": "PNEUMONIA"} and record["data"]["classes"] == ["Effusion", "Pneumonia"]
    rows = read_rows(tmp_path / "eval" / "test_predictions.csv")
    assert list(rows[0]) == ["path", "prob_Pneumonia", "label", "truth_Pneumonia", "status"]
    assert sorted(row["path"] for row in rows) == sorted(pngs[str(image)] for image, _, _ in tested)
    model, task, settings = load_classifier(out / "best.pt", torch.device("cpu"))
    predicted = classify(model, task, settings, [Path(row["path"]) for row in rows], torch.device("cpu"), 128)
    assert [row["prob_Pneumonia"] for row in rows] == [row["prob_PNEUMONIA"] for row in predicted]
    oracle = roc_auc_score([row["truth_Pneumonia"] == "1" for row in rows],
                           [float(row["prob_Pneumonia"]) for row in rows])
    assert record["metrics"]["test/auroc"] == pytest.approx(oracle, abs=1e-9)
    assert record["metrics"]["test/auroc/Pneumonia"] == record["metrics"]["test/auroc"]


def no_test_rows(tmp_path: Path) -> tuple[str, ...]:
    """A CSV-listed dataset whose split column has train and val rows only."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "labels.csv").write_text("Path,Label,Split\na.png,NORMAL,train\nb.png,PNEUMONIA,val\n")
    return "data=csv", f"data.csv={tmp_path / 'labels.csv'}", "data.split_column=Split"


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist: pass a run folder"),
    ("no_best", "no best.pt in"),
    ("old_version", "has version 3, this cxr reads version"),
    ("not_a_checkpoint", "cannot read checkpoint"),
    ("no_test_rows", "has no test rows"),
])
def test_failures_are_one_line_and_a_failed_result(trained, tmp_path, caplog, case, expected):
    out, _ = trained
    data = ()
    checkpoint = {"missing": tmp_path / "nowhere", "no_best": tmp_path, "old_version": tmp_path / "old.pt",
                  "not_a_checkpoint": tmp_path / "notes.pt", "no_test_rows": out}[case]
    torch.save({"version": 3, "model": {}}, tmp_path / "old.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    if case == "no_test_rows":
        data = no_test_rows(tmp_path)
    record = run_safely(evaluate_cfg(f"checkpoint={checkpoint}", *data), tmp_path / "eval", [])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert record["status"] == "failed" and expected in record["error"] and "\n" not in record["error"]
    assert errors == [f"failed: {record['error']}"]
    written = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert (written["status"], written["error"], written["kind"]) == ("failed", record["error"], "evaluation")


def test_the_command_exits_1_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cxr.evaluate", f"checkpoint={tmp_path / 'nowhere'}",
                           f"hydra.run.dir={tmp_path / 'eval'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "does not exist" in errors[0] and "Traceback" not in done.stderr
    assert json.loads((tmp_path / "eval" / "result.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# The transfer table, from evaluation records written here


def evaluation(source: str, run_dir: str, target: str, auroc: float, multilabel: bool = False, **more) -> dict:
    metrics = {"test/auroc": auroc, "test/balanced_acc": auroc - 0.1, "test/ece": 0.05,
               "test/balanced_acc_at_target_youden": auroc - 0.05}
    return {"status": "ok", "error": None, "kind": "evaluation",
            "checkpoint": {"path": f"/runs/{run_dir}/best.pt", "sha256": run_dir * 4, "trained_on": source,
                           "run": run_dir},
            "data": {"name": target, "root": f"/data/{target}", "split": "test", "images": 100,
                     "multilabel": multilabel},
            "metrics": metrics, "intervals": {"test/auroc": [auroc - 0.02, auroc + 0.03]}, "threshold": 0.4,
            "target_threshold": 0.5, "pairs": {"PNEUMONIA": "PNEUMONIA"}, "not_in_target": [], **more}


@pytest.fixture
def transfer_sweep(tmp_path):
    """Two checkpoints (one trained on each dataset) x two targets; one job failed."""
    nih_metrics = {"test/auroc/Pneumonia": 0.7, "test/auroc/Consolidation": 0.6}
    records = [
        evaluation("chest_xray", "kaggle-run", "chest_xray", 0.95),
        evaluation("chest_xray", "kaggle-run", "nih", 0.65, multilabel=True,
                   pairs={"Pneumonia": "PNEUMONIA", "Consolidation": "PNEUMONIA"}, not_in_target=["Lung Opacity"]),
        evaluation("nih", "nih-run", "chest_xray", 0.72, pairs={"PNEUMONIA": "Pneumonia"}),
        {"status": "failed", "error": "data.root does not exist", "kind": "evaluation",
         "checkpoint": {"path": "/runs/nih-run/best.pt", "trained_on": "nih", "run": "nih-run"},
         "data": {"name": "nih", "root": "/data/nih", "split": "test"}, "metrics": {}},
    ]
    records[1]["metrics"].update(nih_metrics)
    for k, record in enumerate(records):
        (tmp_path / f"{k}_job").mkdir()
        (tmp_path / f"{k}_job" / "result.json").write_text(json.dumps(record))
    return tmp_path


def markdown_tables(path) -> list[list[list[str]]]:
    tables, lines = [], []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif lines:
            tables.append([lines[0], *lines[2:]])
            lines = []
    return tables


def test_an_evaluation_sweep_gets_a_transfer_table(transfer_sweep, capsys):
    assert aggregate.main([str(transfer_sweep)]) == 1  # a job failed: the report is written all the same
    assert not (transfer_sweep / "results.md").exists()
    main, at_own, findings = markdown_tables(transfer_sweep / "transfer.md")
    assert main == [["Trained on \\ tested on", "chest_xray", "nih"],
                    ["chest_xray", "0.950 [0.930, 0.980] / 85.0 / 0.050", "0.650 [0.630, 0.680] / 55.0 / 0.050"],
                    ["nih", "0.720 [0.700, 0.750] / 62.0 / 0.050", "failed"]]
    assert at_own[1:] == [["chest_xray", "90.0", "60.0"], ["nih", "67.0", "failed"]]
    assert findings == [["Trained on", "Tested on", "Pneumonia", "Consolidation", "Lung Opacity"],
                        ["chest_xray", "nih", "0.700", "0.600", "n/a"]]
    assert "3_job: failed (data.root does not exist)" in (transfer_sweep / "transfer.md").read_text()
    rows = read_rows(transfer_sweep / "transfer.csv")
    assert [(row["trained_on"], row["tested_on"], row["status"]) for row in rows] == [
        ("chest_xray", "chest_xray", "ok"), ("chest_xray", "nih", "ok"), ("nih", "chest_xray", "ok"),
        ("nih", "nih", "failed")]
    assert (rows[1]["test/auroc"], rows[1]["test/auroc_low"], rows[1]["test/auroc_high"]) == ("0.65", "0.63", "0.68")
    assert rows[1]["test/auroc/Lung Opacity"] == "n/a" and rows[1]["test/auroc/Consolidation"] == "0.6"
    assert rows[1]["pairs"] == "Pneumonia=PNEUMONIA; Consolidation=PNEUMONIA"
    assert "transfer.md" in capsys.readouterr().out


def test_checkpoints_trained_on_the_same_data_are_told_apart_by_their_run(tmp_path):
    for k, run_dir in enumerate(("lr-1e-4", "lr-1e-5")):
        (tmp_path / f"{k}_job").mkdir()
        (tmp_path / f"{k}_job" / "result.json").write_text(json.dumps(evaluation("chest_xray", run_dir, "nih", 0.7)))
    report = aggregate.aggregate(tmp_path)
    assert report.ok and [row["trained_on"] for row in report.jobs] == ["chest_xray (lr-1e-4)", "chest_xray (lr-1e-5)"]

"""Sweeps: the seed's seven variants, real Hydra multiruns in a subprocess, and the aggregator.

The multiruns are the commands a user types (`python -m cxr.train -m ... debug=smoke`); their
reports are read back from the files in the sweep dir.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cxr import aggregate
from tests.conftest import REPO

# the seed's table: variant -> (hidden layers, dense, learning rate)
SEED_TABLE = {
    "resultset1": (1, 8, 1e-5),
    "resultset2": (1, 16, 1e-5),
    "resultset3": (1, 32, 1e-5),
    "resultset4": (2, 8, 1e-5),
    "resultset5": (3, 8, 1e-5),
    "resultset6": (1, 8, 5e-5),
    "resultset7": (1, 8, 1e-4),
}
SEED_HEADERS = ["Model", "Hidden Layer", "Dense Count", "Learning Rate", "Accuracy",
                "Learning Time(ms)"]
REPORT_FILES = ("results.md", "results.csv", "results.png", "curves.png")


def multirun(sweep_dir, *overrides: str) -> subprocess.CompletedProcess:
    """A smoke multirun of heads on a frozen backbone: what a sweep adds (job folders, the report,
    TensorBoard runs) does not depend on what trains, and the frozen path takes a third of the time."""
    return subprocess.run(
        [sys.executable, "-m", "cxr.train", "-m", *overrides, "debug=smoke", "model.freeze_backbone=true",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=1800)  # a shared, busy CPU is slow


def read_tables(path) -> list[list[dict]]:
    """Every Markdown table in results.md: rows of {header: cell}, bold markers removed."""
    tables, lines = [], []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("|"):
            lines.append([c.strip().replace("**", "") for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif lines:
            header, _rule, *rows = lines
            tables.append([dict(zip(header, row, strict=True)) for row in rows])
            lines = []
    return tables


def read_csv(path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_valid_pngs(sweep_dir) -> None:
    for name in ("results.png", "curves.png"):
        with Image.open(sweep_dir / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100, name


def hparams_of(job_dir) -> dict:
    """The HParams dashboard's record of one job, read with TensorBoard's own reader."""
    events = EventAccumulator(str(job_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content, job_dir
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}


# ---------------------------------------------------------------------------------------------
# The seven experiments


def test_experiments_compose_to_the_seed_table(make_cfg):
    """Each experiment overrides the defaults, the data group's lr included (the embedded data
    sets 1e-4): with `experiment` before `_self_`, every job would run the same config."""
    for data in ([], ["data=chest_xray", "data.root=/somewhere"]):
        composed = {}
        for variant in SEED_TABLE:
            cfg = make_cfg(f"experiment={variant}", "debug=smoke", *data)
            composed[cfg.variant] = (cfg.model.hidden_layers, cfg.model.dense, cfg.optimizer.lr)
            assert (cfg.optimizer.name, cfg.model.dropout) == ("adam", 0.5)
            assert cfg.description, variant
        assert composed == SEED_TABLE


# ---------------------------------------------------------------------------------------------
# The aggregator on hand-written results (no training)


def write_result(job_dir, variant: str, seed: int, test_acc: float, val_auroc: float) -> None:
    layers, dense, lr = SEED_TABLE[variant]
    job_dir.mkdir(parents=True)
    history = [{"epoch": e, "train/loss": 0.7 - 0.1 * e, "train/acc": 0.6 + 0.1 * e,
                "val/loss": 0.8 - 0.1 * e, "val/acc": 0.5 + 0.1 * e, "val/auroc": val_auroc}
               for e in (1, 2)]
    result = {
        "status": "ok", "error": None, "variant": variant, "seed": seed,
        "overrides": [f"experiment={variant}", f"seed={seed}", "debug=smoke"],
        "model": {"dense": dense, "hidden_layers": layers, "weights": "imagenet"},
        "optimizer": {"name": "adam", "lr": lr}, "data": {"test": 624},
        "metrics": {"val/acc": 0.9, "val/auroc": val_auroc, "test/acc": test_acc,
                    "test/auroc": 0.95, "test/sensitivity": 0.97, "test/specificity": 0.9},
        "intervals": {"test/acc": [test_acc - 0.02, test_acc + 0.02]},
        "epochs": 2, "best_epoch": 2, "device": "cpu", "history": history,
        "time": {"train_ms": 1000 * (seed + 1), "total_ms": 1500 * (seed + 1)},
    }
    (job_dir / "result.json").write_text(json.dumps(result))


def test_seeds_are_grouped_per_variant_with_mean_std_and_interval(tmp_path):
    # variant k has test accuracy 0.90 + k/100 +- 0.005 over its two seeds; the best validation
    # AUROC belongs to resultset2, which is not the best on test
    for job, (variant, seed) in enumerate((v, s) for v in SEED_TABLE for s in (0, 1)):
        k = int(variant[-1])
        write_result(tmp_path / f"{job}_experiment={variant},seed={seed}", variant, seed,
                     test_acc=0.90 + k / 100 + (0.005 if seed else -0.005),
                     val_auroc=0.99 if k == 2 else 0.90)

    report = aggregate.aggregate(tmp_path)

    assert report.ok and [p.name for p in report.files] == list(REPORT_FILES)
    variants, jobs, *differences = read_tables(tmp_path / "results.md")
    assert [row["Model"] for row in variants] == list(SEED_TABLE)
    assert list(variants[0])[:6] == SEED_HEADERS
    assert [row["n"] for row in variants] == ["2"] * 7
    # Worked by hand for resultset1: two seeds at 90.5 and 91.5 have std 0.707 points; the
    # seeds' half-width is t(0.975, 1 df) = 12.706 x 0.707 / sqrt(2) = 6.353 points, the test
    # set's 1.960 x sqrt(0.91 x 0.09 / 624) = 2.245 points; sqrt(6.353^2 + 2.245^2) = 6.738, so
    # [84.26, 97.74]. The others shift by one point each, clipped at 100.
    expected_ci = ["[84.3, 97.7]", "[85.3, 98.7]", "[86.3, 99.7]", "[87.4, 100.0]", "[88.4, 100.0]",
                   "[89.5, 100.0]", "[90.5, 100.0]"]
    for row, k, ci in zip(variants, range(1, 8), expected_ci, strict=True):
        assert row["Accuracy"] == f"{90 + k:.1f} ± 0.7"
        assert row["Accuracy 95% CI"] == ci
        assert row["Learning Time(ms)"] == "1500 ± 707"
        layers, dense, _ = SEED_TABLE[row["Model"]]
        assert (row["Hidden Layer"], row["Dense Count"]) == (str(layers), str(dense))
    assert [row["Model"] for row in variants if row["Best (val AUROC)"]] == ["resultset2"]
    assert len(jobs) == 14 and jobs[1]["Model"] == "resultset1 seed=1"
    per_job = read_csv(tmp_path / "results.csv")
    assert len(per_job) == 14 and {row["seed"] for row in per_job} == {"0", "1"}
    assert float(per_job[13]["test/acc"]) == pytest.approx(0.975)
    assert_valid_pngs(tmp_path)


def test_accuracy_interval_over_seeds():
    # seeds that agree still leave the test set's sampling error: 1.96 * sqrt(.9 * .1 / 100)
    assert aggregate.accuracy_interval(aggregate.Spread(0.9, 0.0, 3), 100) == pytest.approx(
        (0.9 - 0.0588, 0.9 + 0.0588), abs=1e-4)
    # an accuracy interval stays within [0, 1]; one seed tells nothing about the seeds' spread
    assert aggregate.accuracy_interval(aggregate.Spread(0.98, 0.02, 2), 624)[1] == 1.0
    assert aggregate.accuracy_interval(aggregate.Spread(0.9, math.nan, 1), 624) is None


def test_cli_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as empty:
        aggregate.main([str(tmp_path)])
    assert empty.value.code == 2
    write_result(tmp_path / "0_experiment=resultset1", "resultset1", 0, 0.9, 0.9)
    assert aggregate.main([str(tmp_path)]) == 0
    # a job killed before it wrote result.json
    (tmp_path / "1_experiment=resultset2" / ".hydra").mkdir(parents=True)
    assert aggregate.main([str(tmp_path)]) == 1
    jobs, *differences = read_tables(tmp_path / "results.md")
    assert [row["Status"] for row in jobs] == ["ok", "missing"]
    assert "report: " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Real multiruns (debug=smoke: seconds per job on CPU)


def test_dense_sweep_writes_the_seed_table_and_tensorboard_runs(tmp_path):
    done = multirun(tmp_path, "model.dense=8,16,32")
    assert done.returncode == 0, done.stderr[-3000:]

    table, *differences = read_tables(tmp_path / "results.md")
    assert list(table[0])[:6] == SEED_HEADERS
    assert [row["Dense Count"] for row in table] == ["8", "16", "32"]
    assert [row["Model"] for row in table] == ["model.dense=8", "model.dense=16", "model.dense=32"]
    assert [row["Status"] for row in table] == ["ok"] * 3
    per_job = read_csv(tmp_path / "results.csv")
    assert [row["model.dense"] for row in per_job] == ["8", "16", "32"]
    # one job is marked (which one is checked on hand-written results above)
    assert [row["best_val_auroc"] for row in per_job].count("true") == 1
    assert_valid_pngs(tmp_path)
    assert "| Model" in done.stdout and str(tmp_path / "results.md") in done.stdout

    for row in per_job:  # each job is its own TensorBoard run, with its hyperparameters
        assert hparams_of(tmp_path / row["job"])["model.dense"] == float(row["model.dense"])


def test_a_failed_job_is_reported_and_the_sweep_exits_non_zero(tmp_path):
    done = multirun(tmp_path, "model.dense=8,0")
    assert done.returncode == 1, done.stderr[-3000:]

    table, *differences = read_tables(tmp_path / "results.md")
    assert [(row["Dense Count"], row["Status"]) for row in table] == [("8", "ok"), ("0", "failed")]
    assert "model.dense must be > 0" in table[1]["Error"]
    assert table[1]["Accuracy"] == "—" and table[0]["Best (val AUROC)"] == "yes"
    assert [row["status"] for row in read_csv(tmp_path / "results.csv")] == ["ok", "failed"]
    assert_valid_pngs(tmp_path)
    assert aggregate.main([str(tmp_path)]) == 1  # the CLI agrees, from the same files


@pytest.mark.slow
def test_seeds_crossed_with_variants_give_seven_rows_of_two(tmp_path):
    # 14 jobs: one epoch each and no TensorBoard figures keep it to a few seconds a job
    done = multirun(tmp_path, "experiment=glob(resultset*)", "seed=0,1", "trainer.epochs=1",
                    "trainer.tensorboard_images=false")
    assert done.returncode == 0, done.stderr[-3000:]
    variants, jobs, *differences = read_tables(tmp_path / "results.md")
    assert [row["Model"] for row in variants] == list(SEED_TABLE)
    assert [row["n"] for row in variants] == ["2"] * 7
    assert len(jobs) == 14 and len(read_csv(tmp_path / "results.csv")) == 14


@pytest.mark.slow
def test_item13_a_sweep_logged_to_a_file_is_plain_lines_without_false_warnings(tmp_path, embedded_root):
    """A fresh multirun whose output is not a terminal (as `make sweep > log`): on an empty cache
    (decoding runs) with progress bars asked for, stdout and stderr hold no carriage return (tqdm's
    bar redraws) and no warning about a missing last.pt (a fresh job folder holds no run), and
    each job logs one line per epoch and one per decoded split."""
    root = tmp_path / "data"
    for split, count in (("train", 40), ("test", 8)):
        for label in ("NORMAL", "PNEUMONIA"):
            (root / split / label).mkdir(parents=True)
            for source in sorted((embedded_root / split / label).iterdir())[:count]:
                (root / split / label / source.name).write_bytes(source.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "cxr.train", "-m", "model.dense=4,8", "debug=smoke", "data=chest_xray",
         f"data.root={root}", "model.weights=null", "trainer.progress=true", "trainer.bootstrap=0",
         "trainer.tensorboard_images=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "CXR_CACHE_DIR": str(tmp_path / "cache")})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "\r" not in output, output[-3000:]
    assert "last.pt" not in output, output[-3000:]
    assert len(re.findall(r"epoch 1/2 .* epoch 2/2", output, flags=re.S)) >= 1
    assert len(re.findall(r"\] - epoch [12]/2 ", output)) == 4  # two epochs of two jobs
    # each split once: the second job reads the cache
    assert sorted(re.findall(r"decoded \d+ images of (\w+)", output)) == ["test", "train", "val"]

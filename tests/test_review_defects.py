"""The defects a review found (issue 12), one test each, named after the defect's number.

Each of these failed on the code before its fix. Outcomes are read from what a user sees: exit
codes, stdout and stderr, result.json, the report, TensorBoard's own readers.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

from cxr import aggregate, features
from cxr.data import list_files, load_dataset, patient_id, resolve_root, split_by_patient
from cxr.files import atomic_write
from cxr.model import build_model, weights_digest
from cxr.task import Task
from cxr.train import run, run_safely
from tests.conftest import REPO


def cxr_command(module: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    """Non-zero exit, no traceback anywhere, exactly one line naming the problem."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if needle in line]
    assert len(lines) == 1, output
    return lines[0]


# 1 -------------------------------------------------------------------------------------------
def test_defect1_chest_xray_without_root_is_one_line(tmp_path):
    proc = cxr_command("cxr.train", "data=chest_xray", f"hydra.run.dir={tmp_path}")
    line = assert_one_line_error(proc, "data.root")
    assert "data.root=/path/to/chest_xray" in line


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [0, 1])
def test_defect2_tiny_data_limit_is_one_line(make_cfg, tmp_path, limit):
    result = run_safely(make_cfg("debug=smoke", f"data.limit={limit}"), tmp_path, [])
    assert result["status"] == "failed"
    assert result["error"] == f"data.limit must be null or >= 4 (two images of each class per split), got {limit}"


@pytest.mark.parametrize("damage", ["not a torch file", "truncated", "other shapes", "not a dict"])
def test_defect2_bad_weights_file_is_one_line(make_cfg, tmp_path, damage):
    path = tmp_path / "weights.pt"
    if damage == "not a torch file":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "other shapes":
        torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    else:
        torch.save([torch.zeros(3)], path)
    result = run_safely(make_cfg("debug=smoke", f"model.weights={path}"), tmp_path / "run", [])
    assert result["status"] == "failed"
    assert result["error"].startswith("model.weights") and "\n" not in result["error"]
    if damage == "other shapes":
        assert "conv1.weight" in result["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_defect2_predict_on_a_missing_gpu_is_one_line(tmp_path, embedded_root):
    image = next((embedded_root / "test" / "NORMAL").iterdir())
    proc = cxr_command("cxr.predict", f"checkpoint={tmp_path / 'best.pt'}", f"inputs={image}",
                       "device=cuda", f"output={tmp_path / 'p.csv'}")
    assert "no CUDA GPU" in assert_one_line_error(proc, "device cuda")


# 3 is checked where the launchers run: tests/test_scale.py::test_defect3_*


# 4 -------------------------------------------------------------------------------------------
def kaggle_names(patients: int, seed: int = 0) -> list[tuple[str, int]]:
    """Kaggle-style file names, one to three images per patient, a quarter of patients NORMAL."""
    rng = np.random.default_rng(seed)
    items = []
    for p in range(patients):
        normal = p % 4 == 0
        for k in range(int(rng.integers(1, 4))):
            name = f"IM-{p:04d}-{k + 1:04d}.jpeg" if normal else f"person{p}_bacteria_{3 * p + k}.jpeg"
            items.append((f"/data/train/{'NORMAL' if normal else 'PNEUMONIA'}/{name}", 0 if normal else 1))
    return items


BINARY = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)


def kaggle_patient(path: str) -> str:
    return patient_id(path)[0]


@pytest.mark.parametrize("fraction", [0.1, 0.15, 0.2, 0.3, 0.4, 0.7])
def test_defect4_val_fraction_is_honoured_per_class_and_by_patient(fraction):
    items = kaggle_names(600)
    train, val = split_by_patient(items, fraction, seed=0, patient_of=kaggle_patient, task=BINARY)
    assert sorted(train + val) == sorted(items)
    assert not {kaggle_patient(p) for p, _ in train} & {kaggle_patient(p) for p, _ in val}
    for label in (0, 1):
        share = sum(y == label for _, y in val) / sum(y == label for _, y in items)
        assert abs(share - fraction) <= 0.02, (label, share)


def test_defect4_val_fraction_on_the_embedded_data(make_cfg, embedded_root):
    items = list_files(resolve_root(embedded_root) / "train", ["NORMAL", "PNEUMONIA"])
    train, val = split_by_patient(items, make_cfg("data.val_fraction=0.2").data.val_fraction, seed=0,
                                  patient_of=kaggle_patient, task=BINARY)
    assert abs(len(val) / len(items) - 0.2) <= 0.02


# 5 is checked where torchrun runs: tests/test_scale.py::test_defect5_*

# 6 is checked where the benchmark runs: tests/test_bench.py::test_sweep_section_agrees_with_its_jobs_files
# (the frozen figure is a real sweep) and ::test_loader_passes_each_read_every_image


# 7 -------------------------------------------------------------------------------------------
def test_defect7_bootstrap_does_not_drop_undefined_resamples_silently():
    # two positives, one called positive (0.9) and one not (0.2); negatives all below 0.5. A
    # resample that draws the second positive twice calls nothing positive: precision undefined.
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    p_pos = np.array([0.1, 0.2, 0.3, 0.1, 0.4, 0.2, 0.9, 0.2])
    task = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)
    intervals = task.intervals(labels, np.stack([1 - p_pos, p_pos], 1), 0.5, resamples=500)
    assert intervals["precision"] is None  # not [1, 1] from the resamples where it was defined
    # resampling within each class keeps both classes in every resample: AUROC is always defined
    assert intervals["auroc"] is not None and intervals["specificity"] == [1.0, 1.0]


# 8 -------------------------------------------------------------------------------------------
def test_defect8_a_collapsed_run_is_flagged_in_result_log_and_report(make_cfg, tmp_path, caplog):
    # a threshold no probability reaches: every test image is called NORMAL
    job = tmp_path / "0_trainer.threshold=0.999"
    result = run(make_cfg("debug=smoke", "trainer.threshold=0.999", "trainer.bootstrap=0",
                          "trainer.tensorboard_images=false"), job)
    assert result["status"] == "ok"
    on_disk = json.loads((job / "result.json").read_text())
    assert on_disk["warnings"][0] == "constant predictions: every test image called NORMAL"
    assert any(w.startswith("test accuracy") and "below the majority rate" in w for w in on_disk["warnings"])
    assert "constant predictions" in caplog.text
    aggregate.aggregate(tmp_path)
    assert "constant predictions: every test image called NORMAL" in (tmp_path / "results.md").read_text()


def test_defect8_frozen_features_reach_the_head_standardised(make_cfg, tmp_path):
    """The head's input is (features - mean) / std with the training split's statistics,
    computed here with NumPy from the cached training features."""
    cfg = make_cfg("debug=smoke", "model.freeze_backbone=true", "trainer.bootstrap=0",
                   "trainer.tensorboard_images=false", f"data.cache_dir={tmp_path / 'cache'}",
                   f"data.root={make_cfg('debug=smoke').data.root}")
    assert run(cfg, tmp_path / "run")["status"] == "ok"
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    train = load_dataset(cfg.data).train
    backbone = build_model(cfg.model, cfg.data.image_size, 2, init_seed=cfg.seed).backbone
    key = features.feature_key(train, cfg.data.image_size, cfg.data.window, weights_digest(backbone), cfg.model.pooling,
                               None)
    cached = np.load(tmp_path / "cache" / "features" / f"{key}.npy").astype(np.float64)
    assert cached.shape[0] == len(train)
    np.testing.assert_allclose(best["feature_norm.mean"].numpy(), cached.mean(0), rtol=1e-3, atol=1e-4)
    std = cached.std(0, ddof=1)
    np.testing.assert_allclose(best["feature_norm.std"].numpy(), np.where(std > 1e-6, std, 1.0),
                               rtol=1e-3, atol=1e-4)


# 9 -------------------------------------------------------------------------------------------
def test_defect9_hparams_table_opens_on_what_the_sweep_varies(tmp_path):
    constant = {"data.image_size": 64, "data.name": "synthetic", "model.dropout": 0.5,
                "model.freeze_backbone": False, "seed": 0}
    variants = {"resultset1": (1, 1e-5), "resultset4": (2, 1e-5), "resultset7": (1, 1e-4)}
    for job, (variant, (layers, lr)) in enumerate(variants.items()):
        folder = tmp_path / f"{job}_experiment={variant}"
        folder.mkdir()
        record = {"status": "ok", "variant": variant, "overrides": [f"experiment={variant}"],
                  "model": {"dense": 8, "hidden_layers": layers}, "optimizer": {"lr": lr},
                  "metrics": {"val/auroc": 0.9, "test/auroc": 0.9}, "history": [],
                  "hparams": {**constant, "variant": variant, "model.hidden_layers": layers,
                              "optimizer.lr": lr}}
        (folder / "result.json").write_text(json.dumps(record))
    aggregate.aggregate(tmp_path)

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    backend_context._sort_and_reduce_to_hparams_limit(experiment)  # as TensorBoard lists them
    names = [info.name for info in experiment.hparam_infos]
    assert set(names[:3]) == {"variant", "model.hidden_layers", "optimizer.lr"}
    assert set(names[3:]) == set(constant)
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics[:3] == ["val/auroc", "test/auroc", "test/balanced_acc"]


def test_patient_ids_of_the_kaggle_names():
    assert patient_id("/x/IM-0001-0001.jpeg") == ("IM-0001", "file name pattern")
    assert patient_id("/x/NORMAL2-IM-1427-0001.jpeg") == ("NORMAL2-IM-1427", "file name pattern")
    assert patient_id("/x/person1_bacteria_1.jpeg") == patient_id("/x/person1_virus_7.jpeg") == \
        ("PERSON1", "file name pattern")
    assert patient_id("/x/person10_virus_35.jpeg") != patient_id("/x/person1_virus_35.jpeg")
    assert patient_id("/x/scan-42.png") == ("/x/scan-42.png", "per image")  # a name no pattern knows


def test_nested_copy_and_macosx_are_never_read(tmp_path, embedded_root):
    """The Kaggle zip: chest_xray/{train,val,test}, a nested chest_xray/chest_xray/ duplicate and
    __MACOSX/ with ._* files: data.root at the zip's folder finds the outer copy only."""
    outer = tmp_path / "chest_xray"
    for copy in (outer, outer / "chest_xray", tmp_path / "__MACOSX" / "chest_xray"):
        for split in ("train", "test"):
            for label in ("NORMAL", "PNEUMONIA"):
                folder = copy / split / label
                folder.mkdir(parents=True)
                for source in sorted((embedded_root / split / label).iterdir())[:3]:
                    (folder / source.name).symlink_to(source)
                (folder / f"._{source.name}").write_bytes(b"\x00\x05\x16\x07")
    root = resolve_root(tmp_path)
    assert root == outer
    files = list_files(root / "train", ["NORMAL", "PNEUMONIA"])
    assert len(files) == 6 and all(Path(p).parent.parent.parent == outer for p, _ in files)


class SignalsOnFirstWrite:
    """A file whose first write() sends this process `signum`, as SLURM's USR2 or a Ctrl-C
    arriving while torch.save is halfway through a checkpoint."""

    def __init__(self, file, signum):
        self.file, self.signum, self.sent = file, signum, False

    def write(self, data):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def test_ci_a_signal_that_exits_mid_checkpoint_write_waits_for_a_whole_file(tmp_path):
    """CI found it: submitit's USR2 handler calls sys.exit inside torch.save's write, torch turned
    that into `RuntimeError: unexpected pos`, and the job was recorded as failed, not requeued.
    The handler must run once the file is whole and in place, and its exit must stay an exit."""
    target = tmp_path / "last.pt"
    state = {"weights": torch.arange(300_000, dtype=torch.float32)}

    def exit_now(signum, frame):
        sys.exit(-1)

    previous = signal.signal(signal.SIGUSR2, exit_now)
    try:
        with pytest.raises(SystemExit):
            atomic_write(target, lambda f: torch.save(state, SignalsOnFirstWrite(f, signal.SIGUSR2)))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert torch.equal(torch.load(target)["weights"], state["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

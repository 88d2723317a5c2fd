"""Frozen backbone: features computed once per (data, size, weights, pooling), then reused."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr import features
from cxr.checkpoint import load_classifier
from cxr.data import load_dataset
from cxr.decoding import Split
from cxr.model import build_backbone, build_model, weights_digest
from cxr.train import run
from tests.conftest import REPO


@pytest.fixture(scope="module")
def frozen_cfg(tmp_path_factory):
    """The smoke config with a frozen backbone and a feature cache of its own (data shared)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    cache = tmp_path_factory.mktemp("cache")

    def _compose(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=["debug=smoke", *overrides])

    # the embedded dataset stays where the session generated it; decoded arrays and features
    # go to a cache that starts empty
    root = _compose().data.root
    return lambda *extra: _compose("model.freeze_backbone=true", f"data.cache_dir={cache}",
                                   f"data.root={root}", *extra)


@pytest.fixture
def count_extractions(caplog):
    """Splits whose features the test's runs computed so far, counted from cxr.features' log."""
    caplog.set_level(logging.INFO, logger="cxr.features")
    return lambda: sum(r.name == "cxr.features" and " computed in " in r.getMessage() for r in caplog.records)


def feature_files(cfg) -> dict:
    folder = Path(cfg.data.cache_dir) / "features"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}


def test_frozen_run_computes_features_once_and_reuses_them(frozen_cfg, tmp_path, count_extractions,
                                                           caplog):
    cfg = frozen_cfg()
    first = run(cfg, tmp_path / "first")
    assert first["status"] == "ok"
    assert json.loads((tmp_path / "first" / "result.json").read_text())["status"] == "ok"
    assert first["model"]["freeze_backbone"] is True
    assert torch.isfinite(torch.tensor(first["metrics"]["train/loss"]))
    written = feature_files(cfg)
    assert len(written) == 3 and count_extractions() == 3  # train, val, test: one pass each

    # best.pt holds the head and a reference to the backbone (its init seed and digest), from
    # which predict rebuilds the whole network: a few hundred KB instead of ResNet50's 94 MB
    best_pt = tmp_path / "first" / "best.pt"
    assert not any(k.startswith("backbone.") for k in torch.load(best_pt, weights_only=True)["model"])
    assert best_pt.stat().st_size < 2_000_000
    model, _, _ = load_classifier(best_pt, torch.device("cpu"))
    assert weights_digest(model.backbone) == weights_digest(
        build_model(cfg.model, cfg.data.image_size, 2, init_seed=cfg.seed).backbone)

    second = run(frozen_cfg("data.augment=light"), tmp_path / "second")
    assert second["status"] == "ok"
    assert count_extractions() == 3, "the second run recomputed features"
    assert feature_files(cfg) == written, "the second run rewrote the feature files"
    assert "data.augment does not apply" in caplog.text
    # the same features and the same seed: the same head, the same test predictions
    assert second["metrics"]["test/loss"] == pytest.approx(first["metrics"]["test/loss"])


def test_other_image_size_gets_other_features(frozen_cfg, tmp_path, count_extractions):
    cfg = frozen_cfg("data.image_size=40", "trainer.epochs=1", "trainer.bootstrap=0",
                     "trainer.tensorboard_images=false")
    before = feature_files(cfg)
    assert run(cfg, tmp_path)["status"] == "ok"
    assert len(feature_files(cfg)) == len(before) + 3 and count_extractions() == 3


def test_key_follows_weights_size_window_pooling_and_precision(tmp_path):
    paths = [tmp_path / "a.jpeg", tmp_path / "b.jpeg"]
    for path in paths:
        path.write_bytes(b"x")
    split = Split(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]),
                  [str(path) for path in paths])

    def digest(seed, weights=None):
        torch.manual_seed(seed)
        return weights_digest(build_backbone("resnet50", weights, "flatten", 32))

    seed0 = digest(0)
    assert digest(0) == seed0 and digest(1) != seed0  # random init: the seed is part of the key
    torch.manual_seed(0)
    torch.save(build_backbone("resnet50", None, "flatten", 32).state_dict(), tmp_path / "w.pt")
    assert digest(1, str(tmp_path / "w.pt")) == seed0  # a weights file: keyed by what it holds

    key = features.feature_key(split, 32, "dicom", seed0, "flatten", None)
    assert features.feature_key(split, 32, "dicom", seed0, "flatten", None) == key
    others = [features.feature_key(split, 48, "dicom", seed0, "flatten", None),
              features.feature_key(split, 32, "minmax", seed0, "flatten", None),  # other pictures
              features.feature_key(split, 32, "dicom", digest(1), "flatten", None),
              features.feature_key(split, 32, "dicom", seed0, "avg", None),
              features.feature_key(split, 32, "dicom", seed0, "flatten", torch.bfloat16)]
    assert len({key, *others}) == 6
    paths[0].write_bytes(b"changed")  # an edited file is other data
    assert features.feature_key(split, 32, "dicom", seed0, "flatten", None) != key


def test_the_head_trains_on_one_cpu_thread_and_the_process_keeps_its_own(frozen_cfg, tmp_path):
    """The head's tiny ops on a busy machine ran ~100x slower on 2 OpenMP threads than on one:
    a frozen run trains its head on one thread (last.pt records the count it trained with) and
    gives the process its thread count back; a whole-model run keeps torch's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for frozen in (True, False):
            cfg = frozen_cfg(f"model.freeze_backbone={frozen}", "trainer.epochs=1", "trainer.keep_last=true",
                             "trainer.bootstrap=0", "trainer.tensorboard_images=false")
            out = tmp_path / f"frozen-{frozen}"
            assert run(cfg, out)["status"] == "ok"
            trained_with = torch.load(out / "last.pt", weights_only=False)["num_threads"]
            assert trained_with == (1 if frozen else 2)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def train_feature_file(cfg) -> Path:
    """The cache file of the training split's features, found by its key as cxr.features makes it."""
    train = load_dataset(cfg.data).train
    model = build_model(cfg.model, cfg.data.image_size, 2, init_seed=cfg.seed)
    key = features.feature_key(train, cfg.data.image_size, cfg.data.window, weights_digest(model.backbone),
                               cfg.model.pooling, None)
    return Path(cfg.data.cache_dir) / "features" / f"{key}.npy"


@pytest.mark.parametrize("damage", ["7 bytes overwritten", "truncated"])
def test_item11_a_damaged_feature_file_is_rebuilt_with_a_warning(frozen_cfg, tmp_path, caplog, damage):
    """Issue 20 item 11: 7 bytes overwritten inside a cached feature file were read without a word
    and moved the test metrics. Now the run warns, recomputes the file (the same bytes as the
    undamaged one) and its metrics are the undamaged run's."""
    cfg = frozen_cfg("trainer.epochs=1", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    undamaged = run(cfg, tmp_path / "undamaged")
    array_file = train_feature_file(cfg)
    original = array_file.read_bytes()
    offset = np.load(array_file, mmap_mode="r").offset
    with open(array_file, "r+b") as f:
        if damage == "truncated":
            f.truncate(len(original) - 100)
        else:  # in the middle of the rows, every bit changed
            f.seek(offset + (len(original) - offset) // 2)
            f.write(bytes(b ^ 0xFF for b in original[f.tell():f.tell() + 7]))
    assert array_file.read_bytes() != original

    with caplog.at_level(logging.WARNING, logger="cxr.features"):
        rebuilt = run(cfg, tmp_path / "rebuilt")
    assert [r for r in caplog.records if "is damaged" in r.getMessage() and str(array_file) in r.getMessage()]
    assert array_file.read_bytes() == original
    assert rebuilt["metrics"] == undamaged["metrics"]


# Run in a subprocess: compose the config, decode the training split, then wait for the go file
# and compute (or read) its features, as a sweep job started beside another would.
EXTRACT_BESIDE_ANOTHER = """
import logging, os, sys, time
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from cxr.config import CONF_DIR, register_configs
from cxr.data import load_dataset
from cxr.features import cached_features
from cxr.model import build_model

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
register_configs()
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose("train", sys.argv[2:])
train = load_dataset(cfg.data).train
model = build_model(cfg.model, cfg.data.image_size, 2, init_seed=cfg.seed)
go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
(features,) = cached_features(model.backbone, model.frozen_digest, [train], cfg, torch.device("cpu"), None)
print("sum of features", features.images.double().sum().item())
"""


@pytest.mark.slow
def test_item11_two_jobs_on_an_empty_cache_compute_the_features_once(frozen_cfg, tmp_path):
    """Issue 20 item 11: sweep jobs started together on an empty cache each ran the backbone over
    the whole split. Two real processes released at the same instant: one computes, the other
    waits for it and reads its file (their logs say which), and both get the same features."""
    cfg = frozen_cfg()
    overrides = ["debug=smoke", "model.freeze_backbone=true", f"data.root={cfg.data.root}",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", EXTRACT_BESIDE_ANOTHER, str(go), *overrides], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 2 and all(job.poll() is None for job in jobs):
        assert time.monotonic() < deadline, "the jobs never got ready"
        time.sleep(0.01)
    go.touch()
    logs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(logs)
    computed = [log.count(" computed in ") for log in logs]
    read = [log.count(" read from ") for log in logs]
    assert sorted(computed) == [0, 1] and sorted(read) == [0, 1], "\n".join(logs)
    sums = {line for log in logs for line in log.splitlines() if line.startswith("sum of features")}
    assert len(sums) == 1, sums

"""Frozen backbone: features computed once per (data, size, weights, pooling), then reused."""

import json
import logging
from pathlib import Path

import pytest
import torch

from cxr import features
from cxr.checkpoint import load_classifier
from cxr.decoding import Split
from cxr.model import build_backbone, build_model, weights_digest
from cxr.train import run


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
def count_extractions(monkeypatch):
    calls = []
    original = features.extract

    def counting(backbone, split, *args, **kwargs):
        calls.append(len(split))
        return original(backbone, split, *args, **kwargs)

    monkeypatch.setattr(features, "extract", counting)
    return calls


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
    assert len(written) == 3 and len(count_extractions) == 3  # train, val, test: one pass each

    # best.pt holds the head and a reference to the backbone (its init seed and digest), from
    # which predict rebuilds the whole network: a few hundred KB instead of ResNet50's 94 MB
    best_pt = tmp_path / "first" / "best.pt"
    assert not any(k.startswith("backbone.") for k in torch.load(best_pt, weights_only=True)["model"])
    assert best_pt.stat().st_size < 2_000_000
    model, _, _ = load_classifier(best_pt, torch.device("cpu"))
    assert weights_digest(model.backbone) == weights_digest(
        build_model(cfg.model, cfg.data.image_size, 2, init_seed=cfg.seed).backbone)

    with caplog.at_level(logging.WARNING, logger="cxr.features"):
        second = run(frozen_cfg("data.augment=light"), tmp_path / "second")
    assert second["status"] == "ok"
    assert len(count_extractions) == 3, "the second run recomputed features"
    assert feature_files(cfg) == written, "the second run rewrote the feature files"
    assert "data.augment does not apply" in caplog.text
    # the same features and the same seed: the same head, the same test predictions
    assert second["metrics"]["test/loss"] == pytest.approx(first["metrics"]["test/loss"])


def test_other_image_size_gets_other_features(frozen_cfg, tmp_path, count_extractions):
    cfg = frozen_cfg("data.image_size=40", "trainer.epochs=1", "trainer.bootstrap=0",
                     "trainer.tensorboard_images=false")
    before = feature_files(cfg)
    assert run(cfg, tmp_path)["status"] == "ok"
    assert len(feature_files(cfg)) == len(before) + 3 and len(count_extractions) == 3


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
            cfg = frozen_cfg(f"model.freeze_backbone={frozen}", "trainer.epochs=1", "trainer.keep_last=true")
            out = tmp_path / f"frozen-{frozen}"
            assert run(cfg, out)["status"] == "ok"
            trained_with = torch.load(out / "last.pt", weights_only=False)["num_threads"]
            assert trained_with == (1 if frozen else 2)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

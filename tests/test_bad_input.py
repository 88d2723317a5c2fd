"""Every bad input answered clearly: one line naming what is wrong, and nothing written is lost.

Each test breaks one thing in a small copy of the embedded dataset (Kaggle layout) or in a run,
then reads the outcome back from result.json, the log and the files left on disk. Checkpoints of
another config or version are refused in test_resume.py.
"""

import errno
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from cxr.checkpoint import load_checkpoint
from cxr.data import load_dataset
from cxr.train import run, run_safely

CLASSES = ("NORMAL", "PNEUMONIA")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The runs here check outcomes, not speed: on one CPU thread they stay quick on a busy
    machine, where two OpenMP threads per process mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dataset(tmp_path, embedded_root):
    """root/{train,test}/{NORMAL,PNEUMONIA}/ with 20 images each, copied from the embedded data."""
    root = tmp_path / "data"
    source = embedded_root
    for split in ("train", "test"):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for file in sorted((source / split / label).iterdir())[:20]:
                shutil.copy(file, root / split / label / file.name)
    return root


@pytest.fixture
def cfg_for(make_cfg):
    """A one-epoch CPU run on `root`, seconds long."""

    def _cfg(root, *overrides):
        return make_cfg("debug=smoke", "data=chest_xray", f"data.root={root}", "model.weights=null",
                        "data.image_size=32", "data.limit=null", "trainer.epochs=1",
                        "trainer.bootstrap=0", "trainer.tensorboard_images=false", *overrides)

    return _cfg


def written(out) -> list[str]:
    return sorted(path.name for path in out.iterdir())


def failure(out) -> str:
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed"
    return result["error"]


def test_non_image_files_are_skipped_counted_and_listed(dataset, cfg_for, tmp_path, caplog):
    notes = dataset / "train" / "NORMAL" / "notes.txt"
    notes.write_text("scanned on the old machine\n")
    html = dataset / "test" / "PNEUMONIA" / "person9998_virus_1.jpeg"  # a saved web page
    html.write_text("<html><body>404 Not Found</body></html>\n")
    with caplog.at_level(logging.WARNING, logger="cxr"):
        run(cfg_for(dataset), tmp_path / "run")
    data = json.loads((tmp_path / "run" / "result.json").read_text())["data"]
    assert data["skipped_files"] == 2 and sorted(data["skipped"]) == sorted([str(notes), str(html)])
    assert data["train"] + data["val"] == 40 and data["test"] == 40  # every real image is used
    warning = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "skipped 2 unreadable file(s)" in warning
    assert str(notes) in warning and str(html) in warning


def test_empty_class_folder_is_named(dataset, cfg_for, tmp_path):
    folder = dataset / "train" / "NORMAL"
    for file in folder.iterdir():
        file.unlink()
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden files are never images
    out = tmp_path / "run"
    result = run_safely(cfg_for(dataset), out, [])
    assert result["status"] == "failed"
    assert failure(out) == f"no images in class folder: {folder}"
    assert written(out) == ["result.json"]


@pytest.mark.parametrize("how", ["one class folder", "other class unreadable"])
def test_single_class_dataset_is_named(dataset, cfg_for, tmp_path, how):
    normal = dataset / "train" / "NORMAL"
    if how == "one class folder":
        shutil.rmtree(dataset / "train" / "PNEUMONIA")
        expected = f"need at least two class folders in {dataset / 'train'}, found ['NORMAL']"
    else:
        for file in normal.iterdir():
            file.write_bytes(file.read_bytes()[:100])  # every NORMAL image truncated
        expected = f"no readable images in class folder: {normal}"
    out = tmp_path / "run"
    run_safely(cfg_for(dataset), out, [])
    assert failure(out) == expected
    assert written(out) == ["result.json"]


def test_split_without_readable_images_is_named(dataset, cfg_for, tmp_path):
    for label in CLASSES:
        for i, file in enumerate(sorted((dataset / "test" / label).iterdir())):
            file.write_bytes(b"" if i % 2 else b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "run"
    run_safely(cfg_for(dataset), out, [])
    assert failure(out).startswith(f"no readable images in {dataset / 'test'} (40 skipped; ")
    assert written(out) == ["result.json"]


def test_image_size_too_small_fails_before_any_work(make_cfg, tmp_path):
    result = run_safely(make_cfg("debug=smoke", "data.image_size=16"), tmp_path, [])
    assert result["status"] == "failed"
    assert failure(tmp_path) == "data.image_size must be >= 32 (the backbones downsample 32x), got 16"
    assert written(tmp_path) == ["result.json"]


def test_non_finite_loss_stops_at_once_naming_epoch_and_step(make_cfg, tmp_path):
    # Adam's first step moves every weight by about lr: the second forward pass overflows
    cfg = make_cfg("debug=smoke", "optimizer.lr=1e10", "trainer.tensorboard_images=false")
    run_safely(cfg, tmp_path, [])
    assert failure(tmp_path) == "non-finite loss at epoch 1, step 2"
    # no epoch finished: last.pt still holds the untouched state before training, and no best.pt
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 0 and last["history"] == []
    assert all(torch.isfinite(value).all() for value in last["model"].values())
    assert "best.pt" not in written(tmp_path)


def test_failed_checkpoint_write_keeps_the_previous_one(make_cfg, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full_in_epoch_2(state, path, *args, **kwargs):
        """Half of the file reaches the disk, then the disk is full."""
        if state.get("epoch") != 2:
            return real_save(state, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(state, buffer)
        path.write(buffer.getvalue()[: buffer.tell() // 2])  # the temporary file being written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full_in_epoch_2)
    cfg = make_cfg("debug=smoke", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    run_safely(cfg, tmp_path, [])
    last_path = tmp_path / "last.pt"
    assert failure(tmp_path) == (f"cannot write {last_path}: No space left on device; "
                                 "the previous last.pt is intact")
    assert load_checkpoint(last_path)["epoch"] == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert not [name for name in written(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["array of other images", "truncated array", "damaged index",
                                    "index of another version"])
def test_cache_files_that_do_not_match_are_rebuilt_not_used(dataset, cfg_for, tmp_path, caplog,
                                                            damage):
    data_cfg = cfg_for(dataset, f"data.cache_dir={tmp_path / 'cache'}").data
    decoded = load_dataset(data_cfg)
    # The splits map the cache files, so damage written into a file in place would show through
    # them (and a truncated mapped file is a SIGBUS): keep copies, and let go of the maps first.
    before = {split: (getattr(decoded, split).images.clone(), getattr(decoded, split).paths)
              for split in ("train", "val", "test")}
    del decoded
    for index in (tmp_path / "cache" / "decoded").glob("*.json"):
        array = index.with_suffix(".npy")
        if damage == "array of other images":  # same shape and type: only the content differs
            np.save(array, 255 - np.load(array))
        elif damage == "truncated array":
            array.write_bytes(array.read_bytes()[: array.stat().st_size // 2])
        elif damage == "damaged index":
            index.write_text('{"version": ')
        else:
            index.write_text(json.dumps({**json.loads(index.read_text()), "version": 1}))
    with caplog.at_level(logging.WARNING, logger="cxr"):
        reloaded = load_dataset(data_cfg)
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilding it" in r.getMessage()]
    assert len(rebuilt) == 3  # train, val and test: each refused with a message
    for split, (images, paths) in before.items():
        after = getattr(reloaded, split)
        assert torch.equal(after.images, images) and after.paths == paths

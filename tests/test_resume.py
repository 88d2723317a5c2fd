"""Nothing lost: killed or signalled runs resume exactly, sweep re-runs skip what is finished.

Where a process must die (SIGKILL, SIGTERM) the run is the real command in a subprocess; the rest
calls run() in this process. Every outcome is read back from the files the runs wrote.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cxr.checkpoint import CheckpointError, load_checkpoint
from cxr.train import RunDirError, run, run_safely
from tests.conftest import REPO

# A few seconds per epoch on a CPU, four steps per epoch, bit-for-bit repeatable.
DETERMINISTIC = ("debug=smoke", "trainer.deterministic=true", "trainer.epochs=3",
                 "trainer.bootstrap=0", "trainer.tensorboard_images=false", "trainer.keep_last=true")


# Commands run on one CPU thread, as the reference run does: CPU kernels split their sums by
# thread, and a resumed run must match the reference bit for bit.
def one_thread() -> dict:
    """This process's environment (read now: the session's CXR_CACHE_DIR is set after import) on
    one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start(log, *args: str) -> subprocess.Popen:
    """`python -m cxr.train ARGS` writing to the file `log` (a full pipe would block it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "cxr.train", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=one_thread())


def wait_for(proc: subprocess.Popen, log, folder, pattern: str, timeout: float = 300) -> None:
    """Poll until a file matching `pattern` exists under `folder`, while `proc` runs."""
    deadline = time.monotonic() + timeout
    while not any(folder.glob(pattern)):
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {pattern} appeared:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {pattern} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def read_result(run_dir) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def stamp(path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@pytest.fixture
def restore_threads():
    """A resumed deterministic run takes its CPU thread count from last.pt: undo it afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_cfg):
    """An uninterrupted deterministic run on one thread: what resumed runs must reproduce exactly.

    On one thread, as the commands: the run resumed in this process (two or more threads on most
    machines) must take the thread count of the run it continues.
    """
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(make_cfg(*DETERMINISTIC), out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_sigkill_in_second_epoch_then_resume_gives_identical_metrics(reference, make_cfg,
                                                                     tmp_path, restore_threads):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(log, *DETERMINISTIC, f"hydra.run.dir={run_dir}")
    # best.pt follows epoch 1's last.pt: from then on epoch 2 runs, and its end is seconds away
    wait_for(proc, log, run_dir, "best.pt")
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert not (run_dir / "result.json").exists()

    run(make_cfg(*DETERMINISTIC, "trainer.resume=true"), run_dir)
    resumed, expected = read_result(run_dir), read_result(reference)
    assert resumed["status"] == "ok"
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert resumed["history"] == expected["history"]
    assert resumed["metrics"] == expected["metrics"]
    assert resumed["best_epoch"] == expected["best_epoch"]


def test_sigterm_exits_non_zero_with_one_line_and_a_resumable_last_pt(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(log, "debug=smoke", "trainer.bootstrap=0", f"hydra.run.dir={run_dir}")
    wait_for(proc, log, run_dir, "last.pt")  # training has begun
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "SIGTERM" in line]
    assert len(lines) == 1, output
    assert "trainer.resume=true" in lines[0] and str(run_dir) in lines[0]
    result = read_result(run_dir)
    assert result["status"] == "interrupted" and result["error"] in lines[0]
    # stopped in epoch 1: last.pt is the state before training, complete and resumable
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 0 and last["history"] == [] and "optimizer" in last
    assert "the state before training" in lines[0]


def test_resume_with_another_config_is_refused_and_changes_nothing(reference, make_cfg):
    before = {path.name: stamp(path) for path in reference.iterdir() if path.is_file()}
    with pytest.raises(CheckpointError, match=r"another config \(model\.dense differ"):
        run(make_cfg(*DETERMINISTIC, "model.dense=16", "trainer.resume=true"), reference)
    assert {path.name: stamp(path) for path in reference.iterdir() if path.is_file()} == before


def test_checkpoint_of_another_version_is_refused_and_kept(make_cfg, tmp_path):
    last = tmp_path / "last.pt"
    torch.save({"version": 1, "epoch": 1, "model": {}}, last)
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match="has version 1, this cxr reads version"):
        run(make_cfg(*DETERMINISTIC, "trainer.resume=true"), tmp_path)
    assert last.read_bytes() == before
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.slow
def test_sweep_rerun_skips_finished_reruns_failed_and_resumes_interrupted_jobs(tmp_path):
    """Job 0 finishes, job 1 fails (the loss diverges), job 2 is stopped in its second epoch."""
    sweep, log = tmp_path / "sweep", tmp_path / "log"
    command = ("-m", "debug=smoke", "optimizer.lr=1e-4,1e10,2e-4", "trainer.bootstrap=0",
               "trainer.tensorboard_images=false", f"hydra.sweep.dir={sweep}")
    proc = start(log, *command)
    wait_for(proc, log, sweep, "2_*/best.pt")  # job 2 has finished epoch 1
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 130, log.read_text()  # a signal stops the whole sweep
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [read_result(job)["status"] for job in jobs] == ["ok", "failed", "interrupted"]
    finished = {name: stamp(jobs[0] / name) for name in ("result.json", "best.pt")}
    assert not (jobs[0] / "last.pt").exists()  # removed once the job ended ok
    failed_before = stamp(jobs[1] / "result.json")

    second = subprocess.run([sys.executable, "-m", "cxr.train", *command], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=one_thread(),
                            timeout=600)
    output = second.stdout
    assert second.returncode == 1, output  # the report marks the failed job
    assert f"already finished: {jobs[0] / 'result.json'} (status ok), skipping" in output
    assert {name: stamp(jobs[0] / name) for name in finished} == finished
    assert stamp(jobs[1] / "result.json") != failed_before
    assert read_result(jobs[1])["error"] == "non-finite loss at epoch 1, step 2"
    assert f"resumed from {jobs[2] / 'last.pt'} at epoch 2" in output
    resumed = read_result(jobs[2])
    assert resumed["status"] == "ok" and [row["epoch"] for row in resumed["history"]] == [1, 2]

    with (sweep / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((float(row["optimizer.lr"]), row["status"]) for row in rows) == [
        (1e-4, "ok"), (2e-4, "ok"), (1e10, "failed")]


def tree_bytes(folder) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_fresh_run_into_a_used_run_dir_is_refused_and_changes_nothing(tmp_path):
    args = ("debug=smoke", "model.freeze_backbone=true", "trainer.epochs=1", "trainer.bootstrap=0",
            "trainer.tensorboard_images=false", f"hydra.run.dir={tmp_path}")
    first = subprocess.run([sys.executable, "-m", "cxr.train", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_bytes(tmp_path)
    assert "best.pt" in before and "result.json" in before and ".hydra/config.yaml" in before

    second = subprocess.run([sys.executable, "-m", "cxr.train", *args, "model.dense=16"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode != 0 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "already holds a run" in line]
    assert str(tmp_path) in line and "trainer.resume=true" in line
    assert tree_bytes(tmp_path) == before


def test_keep_last_makes_a_finished_run_extendable_by_more_epochs(make_cfg, tmp_path):
    quick = ("debug=smoke", "model.freeze_backbone=true", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    first = run(make_cfg(*quick, "trainer.keep_last=true"), tmp_path)  # 2 epochs
    assert first["epochs"] == 2 and (tmp_path / "last.pt").exists()

    extended = run_safely(make_cfg(*quick, "trainer.keep_last=true", "trainer.resume=true",
                                   "trainer.epochs=4"), tmp_path, [])
    assert extended["status"] == "ok" and extended["epochs"] == 4
    assert [row["epoch"] for row in extended["history"]] == [1, 2, 3, 4]
    assert extended["history"][:2] == first["history"]
    assert read_result(tmp_path)["epochs"] == 4


def test_a_finished_run_without_last_pt_cannot_be_extended_and_stays_as_it_was(make_cfg, tmp_path):
    quick = ("debug=smoke", "trainer.epochs=1", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    run(make_cfg(*quick), tmp_path)
    assert not (tmp_path / "last.pt").exists()  # removed once the run ended ok
    before = tree_bytes(tmp_path)
    with pytest.raises(RunDirError, match="only a run made with trainer.keep_last=true can be extended"):
        run_safely(make_cfg(*quick, "trainer.resume=true", "trainer.epochs=3"), tmp_path, [])
    assert tree_bytes(tmp_path) == before


@pytest.mark.slow
def test_resume_restores_the_grad_scaler(make_cfg, tmp_path):
    """fp16 autocast (here on the CPU) trains with a GradScaler whose state (the loss scale, the
    steps since the last overflow) must carry over: a run resumed after epoch 1 ends with the
    scaler state and history of an uninterrupted one. Restarted, its count of steps since the last
    overflow would start again from 0 (and a backed-off scale from 2^16)."""
    # the head on a frozen backbone: the scaler is the same object as for the whole network, and
    # fp16 on a CPU takes minutes through a whole ResNet50
    fp16 = ("debug=smoke", "model.freeze_backbone=true", "trainer.amp=fp16", "trainer.keep_last=true",
            "trainer.bootstrap=0", "trainer.tensorboard_images=false", "trainer.deterministic=true")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(make_cfg(*fp16, "trainer.epochs=2"), whole)
    run(make_cfg(*fp16, "trainer.epochs=1"), resumed)
    after_one = load_checkpoint(resumed / "last.pt")["scaler"]
    assert after_one is not None and after_one["_growth_tracker"] == 4  # 64 images in batches of 16
    run(make_cfg(*fp16, "trainer.epochs=2", "trainer.resume=true"), resumed)
    assert load_checkpoint(resumed / "last.pt")["scaler"] == load_checkpoint(whole / "last.pt")["scaler"]
    assert read_result(resumed)["history"] == read_result(whole)["history"]


def test_official_val_split_uses_the_val_folder(make_cfg, tmp_path, embedded_root):
    cfg = make_cfg("debug=smoke", "data.val_split=official", "data.limit=null", "model.freeze_backbone=true",
                   "trainer.epochs=1", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    result = run(cfg, tmp_path)
    official_val = sum(1 for _ in (embedded_root / "val").rglob("*.jpeg"))
    official_train = sum(1 for _ in (embedded_root / "train").rglob("*.jpeg"))
    assert (result["data"]["val"], result["data"]["train"]) == (official_val, official_train)


@pytest.mark.slow
def test_item2_a_sweep_rerun_after_a_config_edit_is_refused_then_rerun_when_asked(tmp_path):
    """The experiment file's lr is edited between two runs into one hydra.sweep.dir: the job's
    folder name stays the same, so before the fix its old result was skipped over as current."""
    experiments = tmp_path / "conf" / "experiment"
    experiments.mkdir(parents=True)
    edited = experiments / "edited.yaml"
    edited.write_text("# @package _global_\noptimizer:\n  lr: 1.0e-4\n")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "cxr.train", "-m", "experiment=edited", "debug=smoke",
               "model.freeze_backbone=true", "trainer.epochs=1", "trainer.bootstrap=0",
               "trainer.tensorboard_images=false", f"hydra.sweep.dir={sweep}",
               f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]

    def sweep_run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=one_thread(), timeout=600)

    first = sweep_run()
    assert first.returncode == 0, first.stdout[-3000:]
    (job,) = [path for path in sweep.iterdir() if path.is_dir()]
    assert read_result(job)["optimizer"]["lr"] == 1e-4
    run_files = lambda: {path.name: stamp(path) for path in job.iterdir()  # noqa: E731
                         if path.is_file() and path.suffix != ".log"}  # Hydra appends each launch's log
    before = run_files()

    edited.write_text("# @package _global_\noptimizer:\n  lr: 2.0e-4\n")
    refused = sweep_run()
    assert refused.returncode == 1 and "Traceback" not in refused.stdout, refused.stdout[-3000:]
    (line,) = [line for line in refused.stdout.splitlines() if "trainer.rerun_changed=true" in line]
    assert "optimizer.lr" in line and str(job) in line and "skipping" not in refused.stdout
    assert run_files() == before

    rerun = sweep_run("trainer.rerun_changed=true")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert [path for path in sweep.iterdir() if path.is_dir()] == [job]  # the same job folder
    result = read_result(job)
    assert result["status"] == "ok" and result["optimizer"]["lr"] == 2e-4
    assert result["fingerprint"]["optimizer.lr"] == 2e-4
    assert stamp(job / "best.pt") != before["best.pt"]
    assert "skipping" in sweep_run("trainer.rerun_changed=true").stdout  # now current: skipped


def write_csv_dataset(folder, embedded_root) -> None:
    """12 train and 4 test images of each class, copied from the embedded dataset, listed in
    folder/labels.csv (paths relative to the CSV's folder)."""
    (folder / "img").mkdir(parents=True)
    rows = ["Path,Label,Split"]
    for split, count in (("train", 12), ("test", 4)):
        for label in ("NORMAL", "PNEUMONIA"):
            for source in sorted((embedded_root / split / label).iterdir())[:count]:
                (folder / "img" / source.name).write_bytes(source.read_bytes())
                rows.append(f"img/{source.name},{label},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.slow
def test_item6_a_resume_checks_the_images_and_labels_not_where_they_are(make_cfg, tmp_path, embedded_root):
    data, moved, run_dir = tmp_path / "data", tmp_path / "moved", tmp_path / "run"
    write_csv_dataset(data, embedded_root)
    args = ("debug=smoke", "data=csv", "data.split_column=Split", "model.weights=null", "trainer.keep_last=true",
            "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    run(make_cfg(*args, f"data.csv={data / 'labels.csv'}", "trainer.epochs=1"), run_dir)

    data.rename(moved)  # the same images and labels elsewhere: resumed (extended by an epoch)
    resumed = make_cfg(*args, f"data.csv={moved / 'labels.csv'}", "trainer.epochs=2", "trainer.resume=true")
    run(resumed, run_dir)
    assert [row["epoch"] for row in read_result(run_dir)["history"]] == [1, 2]

    table = moved / "labels.csv"
    original = table.read_text()
    extra = sorted((embedded_root / "train" / "NORMAL").iterdir())[20]
    (moved / "img" / extra.name).write_bytes(extra.read_bytes())
    lines = original.splitlines()
    relabelled = next(i for i, line in enumerate(lines) if line.endswith(",NORMAL,test"))
    changes = {"an added image": original + f"img/{extra.name},NORMAL,train\n",
               "a removed image": "\n".join(lines[:1] + lines[2:]) + "\n",
               "a changed label": "\n".join(line.replace(",NORMAL,", ",PNEUMONIA,") if i == relabelled else line
                                            for i, line in enumerate(lines)) + "\n"}
    before = {path.name: stamp(path) for path in run_dir.iterdir() if path.is_file()}
    for change, text in changes.items():
        table.write_text(text)
        with pytest.raises(CheckpointError) as refused:
            run(make_cfg(*args, f"data.csv={table}", "trainer.epochs=3", "trainer.resume=true"), run_dir)
        message = str(refused.value)
        assert "\n" not in message and "other images or labels" in message and str(run_dir) in message, change
        assert ("test" if change == "a changed label" else "train") in message, change
        assert {path.name: stamp(path) for path in run_dir.iterdir() if path.is_file()} == before, change
    table.write_text(original)  # as it was: resumable again
    run(make_cfg(*args, f"data.csv={table}", "trainer.epochs=3", "trainer.resume=true"), run_dir)
    assert [row["epoch"] for row in read_result(run_dir)["history"]] == [1, 2, 3]

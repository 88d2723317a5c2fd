"""The benchmark (`python -m cxr.bench SUITE`), checked against facts it cannot make up: the files its
sweeps wrote, the images it was asked for, a ResNet50's parameter count from torchvision, and
hand-computed time estimates. The subcommands run in subprocesses, as a user runs them (slow)."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torchvision

from cxr.bench.gpu import GPU_SUITE_KEYS
from cxr.bench.gpu_plan import SECTIONS, Rates, Scale, estimate_s, over_budget, with_sweep, with_trainer
from cxr.bench.runs import job_errors, sweep_jobs
from tests.conftest import REPO

VARIANTS = tuple(f"resultset{k}" for k in range(1, 8))


def bench(*args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _at(report: dict, dotted: str):
    """report["a"]["b"] for "a.b"; a KeyError names a missing key."""
    value = report
    for part in dotted.split("."):
        value = value[part]
    return value


def results_of(sweep_dir: Path) -> list[dict]:
    """Every job's result.json under a sweep folder, read here, not through cxr."""
    return [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*_*/result.json"))]


# ---------------------------------------------------------------------------------------------
# The subcommands


@pytest.mark.slow
def test_help_lists_every_subcommand_and_names_the_old_flags():
    listed = bench("--help").stdout
    for suite in ("loader", "train", "sweep", "gpu", "cache", "index", "all"):
        assert f"\n    {suite} " in listed, suite
    done = bench("--gpu-suite")
    assert done.returncode == 2 and done.stderr == "error: --gpu-suite is now a subcommand: python -m cxr.bench gpu\n"


@pytest.mark.slow
@pytest.mark.parametrize("trainable, words", [("whole", "whole network"), ("head", "head on frozen features")])
def test_defect8_train_sides_run_the_same_network_on_the_same_batches(tmp_path, trainable, words):
    """Both sides train what --trainable says, whatever the data group's default (the embedded
    one freezes the backbone): the same parameters changed on each side (a whole ResNet50 holds
    torchvision's 23.5 M of its trunk; a head a tiny share of that), and each side fed its module
    the 2 x 4 images asked for, at the size asked for."""
    out = tmp_path / "train.json"
    done = bench("train", "--quick", "--device", "cpu", "--steps", "2", "--batch-size", "4", "--size", "32",
                 "--trainable", trainable, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    resnet50 = torchvision.models.resnet50()
    trunk = sum(p.numel() for p in resnet50.parameters()) - sum(p.numel() for p in resnet50.fc.parameters())
    bare, trainer = report["bare"], report["trainer"]
    assert bare["trainable"] == trainer["trainable"] == report["trainable"] == words
    assert bare["parameters"] == trainer["parameters"]
    assert (bare["parameters"] > trunk) if trainable == "whole" else (0 < bare["parameters"] < trunk / 100)
    assert bare["images"] == trainer["images"] == 8
    assert bare["image_size"] == trainer["image_size"] == 32 and bare["batch_size"] == trainer["batch_size"] == 4


@pytest.mark.slow
def test_bench_refuses_unknown_config_names_in_one_line(tmp_path):
    """The benchmark composes its configs as cxr.train does: a name the schema or the option table
    does not know stops it with one line, before any work."""
    done = bench("train", "--quick", "--device", "cpu", "--out", str(tmp_path / "t.json"), "optimizer.name=bogus")
    assert done.returncode == 2 and done.stderr == "error: optimizer.name must be adam|adamw|sgd, got bogus\n"
    done = bench("train", "--quick", "--device", "cpu", "--out", str(tmp_path / "t.json"), "model.dens=8")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "model.dens" in done.stderr
    assert not (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_loader_passes_each_read_every_image(tmp_path):
    out = tmp_path / "loader.json"
    done = bench("loader", "--quick", "--count", "20", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["images_per_pass"] == {"naive": 20, "build": 20, "cached": 20, "normalised": 20}
    assert report["source"]["count"] == 20 and report["size"] == 32


@pytest.mark.slow
def test_sweep_section_agrees_with_its_jobs_files(tmp_path):
    """What the sweep section reports is what its jobs' result.json files say: every variant ran,
    ended ok, for the epochs stated, on as many images as the one backbone pass read."""
    out, work = tmp_path / "sweep.json", tmp_path / "work"
    done = bench("sweep", "--quick", "--device", "cpu", "--work", str(work), "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    records = results_of(work / "sweep")
    assert report["variants"] == ["resultset1", "resultset7"] and report["sweep_dir"] == str(work / "sweep")
    assert sorted(record["variant"] for record in records) == report["variants"]
    assert [record["status"] for record in records] == ["ok"] * report["jobs"] and report["jobs_ok"] == len(records)
    for record in records:
        assert record["epochs"] == report["epochs"] == 1 and record["model"]["freeze_backbone"] is True
        assert record["data"]["image_size"] == report["size"]
        assert sum(record["data"][split] for split in ("train", "val", "test")) == report["images"] == 24
    assert report["errors"] == {} and report["one_backbone_pass_s"] < report["sweep_s"]


@pytest.mark.slow
def test_cache_build_child_builds_every_image(tmp_path):
    out = tmp_path / "cache.json"
    done = bench("cache", "--quick", "--counts", "40", "--no-compare", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mapped"]["40"]["images"] == 40 and report["in_memory"] == {}
    assert report["dicom"]["40"]["images"] == 40 and report["dicom"]["40"]["build_img_s"] > 0  # the same pictures


@pytest.mark.slow
def test_index_suite_quick_indexes_every_row_of_both_tables(tmp_path):
    """2,000 rows, 4 images per patient, every fifth patient in the test list: 100 patients x 4
    images are test, the other 1,600 train, through data=nih and data=csv alike."""
    out = tmp_path / "index.json"
    done = bench("index", "--quick", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["rows"] == 2000 and report["items"] == {"train": 1600, "val": 0, "test": 400}


# ---------------------------------------------------------------------------------------------
# The GPU check


@pytest.mark.slow  # 1-3 minutes on 2 shared cores: six real sweep jobs
def test_gpu_quick_writes_every_key_on_cpu(tmp_path):
    """`gpu --quick` on a CPU: every key the GPU run writes; what a CPU can measure agrees with the
    files the check made (its generated images, its sweeps' result.json), and each CUDA-only
    figure is null with its reason."""
    out, work = tmp_path / "gpu.json", tmp_path / "work"
    done = bench("gpu", "--quick", "--device", "cpu", "--budget-s", "3600", "--work", str(work), "--out", str(out),
                 timeout=1200)  # a budget a busy machine cannot outrun: what it skips is tested below
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in GPU_SUITE_KEYS:
        if _at(report, key) is None:
            assert any(key == path or key.startswith(path + ".") for path in report["skipped"]), key
    scale = report["scale"]
    for split, count in (("train", scale["train_images"]), ("test", scale["test_images"])):
        assert len(list((work / "kaggle" / split).glob("*/*.jpeg"))) == count
    for name, jobs_per_gpu, frozen in (("jobs_per_gpu_1", 1, False), ("jobs_per_gpu_2", 2, False), ("frozen", 1, True)):
        sweep, records = report["sweeps"][name], results_of(work / f"sweep-{name}")
        assert sweep["jobs_ok"] == sweep["jobs"] == len(records) == 2 and sweep["errors"] == {}, name
        assert all(record["status"] == "ok" and record["model"]["freeze_backbone"] is frozen
                   and f"jobs_per_gpu={jobs_per_gpu}" in record["overrides"] for record in records), name
        assert sweep["train_s"] == pytest.approx(sum(record["time"]["train_ms"] for record in records) / 1000)
    assert report["trainer_img_s"]["tf32"] > 0 and report["all_jobs_ok"] is True and report["failed_sections"] == {}
    assert report["budget"]["skipped_sections"] == ["jobs_per_gpu_4", "compile"]
    assert set(report["budget"]["section_s"]) == {"data", "trainer", "jobs_per_gpu_1", "jobs_per_gpu_2", "frozen"}
    assert report["work_dir"] == str(work.resolve())


@pytest.mark.slow
def test_gpu_budget_skips_what_does_not_fit(tmp_path):
    """A budget nothing fits in: every section is listed as skipped with its reason, and the JSON
    still holds every key (null)."""
    out = tmp_path / "gpu.json"
    done = bench("gpu", "--quick", "--device", "cpu", "--budget-s", "0.001", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["budget"]["skipped_sections"] == list(SECTIONS) and report["budget"]["section_s"] == {}
    for key in GPU_SUITE_KEYS:
        _at(report, key)
    assert report["data_prep_s"] is None and report["skipped"]["data_prep_s"].startswith("over budget: estimated")
    assert report["skipped"]["sweeps.frozen"] == "needs the data section, which did not run"


@pytest.mark.slow
def test_gpu_check_without_hydra_fails_in_one_line(tmp_path):
    """A GPU host's Python with torch but no Hydra: one line naming what is missing and the
    offline install from the carried wheels, no traceback."""
    site = tmp_path / "site"
    site.mkdir()
    hydra_parts = ("hydra", "omegaconf", "antlr4")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(hydra_parts):
            (site / entry.name).symlink_to(entry)
    # -S: no site-packages but the linked ones (PYTHONPATH), as on a host whose Python lacks Hydra
    done = subprocess.run([sys.executable, "-S", "-m", "cxr.bench", "gpu", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": f"{REPO}:{site}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    carried = "hydra-core omegaconf antlr4-python3-runtime hydra-joblib-launcher"
    assert done.stderr.startswith(f"error: {carried.replace(' ', ', ')} are not importable")
    assert f"--no-index --find-links .whl {carried}" in done.stderr


# ---------------------------------------------------------------------------------------------
# The GPU check's plan: pure functions, with an H100's figures


H100_SCALE = Scale(224, 5216, 624, 32, 2048, 3, 2, 20, (1, 2, 4), VARIANTS)
H100_RATES = Rates(img_s_224=2500.0, build_s=5.0, job_overhead_s=20.0, compile_s=100.0, image_s=0.05)


def test_gpu_section_estimates_by_hand_at_h100_rates():
    # 5,840 images; 7 jobs; an epoch of a job is 5,840 images at 2,500 img/s = 2.336 s
    by_hand = {"data": 5840 * 0.05 / 16,  # 18.25 s over 16 cores
               "trainer": 3 * 5 + 13 * 2048 / 2500,  # 3 builds; 3 x (warm-up + 3 timed) + 1 profiled epochs
               "jobs_per_gpu_1": 7 * 2 * 2.336 + 7 * 20,  # 172.704: training, then 7 overheads in a row
               "jobs_per_gpu_2": 7 * 2 * 2.336 + 4 * 20,  # overheads two at a time
               "jobs_per_gpu_4": 7 * 2 * 2.336 + 2 * 20,
               "frozen": 2.336 / 3 + 7 * 20,  # one forward pass over every image
               "compile": 5 + 100 + 3 * 2048 / 2500}
    for section in SECTIONS:
        assert estimate_s(section, H100_SCALE, H100_RATES, cores=16) == pytest.approx(by_hand[section]), section
    half = Scale(112, 5216, 624, 32, 2048, 3, 2, 20, (1, 2, 4), VARIANTS)  # a quarter of the pixels: 4x the img/s
    assert estimate_s("jobs_per_gpu_1", half, H100_RATES, cores=16) == pytest.approx(7 * 2 * 2.336 / 4 + 7 * 20)


def test_gpu_budget_runs_a_section_only_if_it_fits_what_is_left():
    assert over_budget(172.704, elapsed_s=300, budget_s=480) is None  # 180 s left
    assert over_budget(172.704, elapsed_s=320, budget_s=480) == ("over budget: estimated 173 s, 160 s of "
                                                                 "--budget-s 480 left")
    assert over_budget(10, elapsed_s=500, budget_s=480) == "over budget: estimated 10 s, 0 s of --budget-s 480 left"


def test_gpu_estimates_learn_from_what_was_measured():
    assert with_trainer(H100_RATES, img_s=625.0, image_size=112).img_s_224 == pytest.approx(156.25)
    # 7 jobs two at a time: 60 s of training shared by two is 30 s; 70 s over 4 rounds of overhead
    assert with_sweep(H100_RATES, sweep_s=100.0, train_s=60.0, jobs=7, jobs_per_gpu=2).job_overhead_s == 17.5
    assert with_sweep(H100_RATES, sweep_s=10.0, train_s=60.0, jobs=7, jobs_per_gpu=1).job_overhead_s == 0.0


def test_failed_jobs_error_lines_come_from_their_result_files(tmp_path):
    """A sweep folder as a multirun leaves it: one job ok, one failed with its error line, one
    killed before writing result.json, one never started (four expected)."""
    for name, record in (("0_lr=1", {"status": "ok", "error": None}),
                         ("1_lr=2", {"status": "failed", "error": "CUDA error: out of memory"}),
                         ("2_lr=3", None)):
        (tmp_path / name).mkdir()
        if record is not None:
            (tmp_path / name / "result.json").write_text(json.dumps(record))
    errors = job_errors(sweep_jobs(tmp_path), expected=4)
    assert errors == {"1_lr=2": "CUDA error: out of memory",
                      "2_lr=3": "no result.json: the job's log in its folder says why",
                      "(not started)": "1 job(s) never started"}

"""`python -m cxr.bench --quick` runs end to end and writes every figure, measured the honest way."""

import json
import subprocess
import sys

import pytest

from cxr.bench import GPU_SUITE_KEYS
from tests.conftest import REPO

KEYS = {
    "loader": ("naive_img_s", "cache_build_img_s", "cached_img_s", "cached_normalised_img_s"),
    "train": ("bare_img_s", "trainer_img_s", "trainer_vs_bare"),
    "frozen": ("one_backbone_pass_s", "sweep_s", "per_job_beyond_one_pass_s"),
}


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    command = [sys.executable, "-m", "cxr.bench", "--quick", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


# the benchmark's ~20 s subprocess runs with the slow checks: the fast suite was at 2 min 47 s
@pytest.mark.slow
def test_quick_bench_writes_every_key(quick_bench):
    report, stdout = quick_bench
    assert report["device"].startswith("cpu")
    for section, keys in KEYS.items():
        for key in keys:
            value = report[section][key]
            assert isinstance(value, float) and value > 0, f"{section}.{key} = {value}"
        assert section in stdout  # the printed table shows the same figures
    assert "gpu" not in report  # CUDA only


@pytest.mark.slow
def test_defect6_headline_ratios_compare_like_with_like(quick_bench):
    """The loader target compares normalised float batches on both sides (not the cache's raw
    uint8 against the naive loader's floats), and the frozen figure is a real sweep: its jobs
    finished ok, and it took longer than the one backbone pass it contains."""
    report, _ = quick_bench
    loader = report["loader"]
    assert report["targets"]["loader.cached >= 20x naive"] == (loader["cached_normalised_vs_naive"] >= 20)
    frozen = report["frozen"]
    assert frozen["variants"] == ["resultset1", "resultset7"]
    assert frozen["jobs_ok"] == 2 and report["targets"]["frozen.every job of the sweep ok"]
    assert frozen["sweep_s"] > frozen["one_backbone_pass_s"]


def _at(report: dict, dotted: str):
    """report["a"]["b"] for "a.b"; a KeyError names a missing key."""
    value = report
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.slow  # ~2.5 minutes on 2 cores (21 real sweep jobs): more than the fast suite can spare
def test_gpu_suite_quick_writes_every_key_on_cpu(tmp_path):
    """`--gpu-suite --quick` on a CPU: every key the GPU run writes; what a CPU can measure is a
    positive number, every sweep job ended ok, and each CUDA-only figure is null with its reason."""
    out = tmp_path / "gpu_suite.json"
    command = [sys.executable, "-m", "cxr.bench", "--gpu-suite", "--quick", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"written to {out}" in done.stdout
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["quick"] is True
    for key in GPU_SUITE_KEYS:
        if _at(report, key) is None:
            assert any(key == path or key.startswith(path + ".") for path in report["skipped"]), key
    timed = ["data_prep_s", "total_s", "trainer_img_s.fp32", "trainer_img_s.bf16", "trainer_img_s.bf16_channels_last"]
    for sweep in ("jobs_per_gpu_1", "jobs_per_gpu_2", "frozen"):
        assert _at(report, f"sweeps.{sweep}.jobs_ok") == _at(report, f"sweeps.{sweep}.jobs") == 7, sweep
        timed += [f"sweeps.{sweep}.sweep_s", f"sweeps.{sweep}.train_s"]
    for key in timed:
        value = _at(report, key)
        assert isinstance(value, float) and value > 0, f"{key} = {value}"
    assert report["all_jobs_ok"] is True
    assert report["sweeps"]["frozen"]["freeze_backbone"] is True
    assert report["sweeps"]["jobs_per_gpu_2"]["jobs_per_gpu"] == 2
    for key in ("trainer_img_s.compile", "compile_s", "busy_fraction", "sweeps.jobs_per_gpu_1.peak_gpu_memory_mb"):
        assert _at(report, key) is None, key  # CUDA only


@pytest.mark.slow
def test_index_suite_quick_indexes_every_row_of_both_tables(tmp_path):
    """2,000 rows, 4 images per patient, every fifth patient in the test list: 100 patients x 4
    images are test, the other 1,600 train, through data=nih and data=csv alike."""
    out = tmp_path / "index.json"
    subprocess.run([sys.executable, "-m", "cxr.bench", "--index-suite", "--quick", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text())
    assert report["rows"] == 2000 and report["items"] == {"train": 1600, "val": 0, "test": 400}
    assert all(report[key] > 0 for key in ("nih_s", "csv_findings_s", "val_carve_s"))

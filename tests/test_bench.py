"""`python -m cxr.bench --quick` runs end to end and writes every figure, measured the honest way."""

import json
import subprocess
import sys

import pytest

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


def test_quick_bench_writes_every_key(quick_bench):
    report, stdout = quick_bench
    assert report["device"].startswith("cpu")
    for section, keys in KEYS.items():
        for key in keys:
            value = report[section][key]
            assert isinstance(value, float) and value > 0, f"{section}.{key} = {value}"
        assert section in stdout  # the printed table shows the same figures
    assert "gpu" not in report  # CUDA only


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

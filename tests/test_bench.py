"""`python -m cxr.bench --quick` runs end to end and writes every figure the issue asks for."""

import json
import subprocess
import sys

from tests.conftest import REPO

KEYS = {
    "loader": ("naive_img_s", "cache_build_img_s", "cached_img_s"),
    "train": ("bare_img_s", "trainer_img_s", "trainer_vs_bare"),
    "frozen": ("one_backbone_pass_s", "seven_heads_s"),
}


def test_quick_bench_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "cxr.bench", "--quick", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu")
    for section, keys in KEYS.items():
        for key in keys:
            value = report[section][key]
            assert isinstance(value, float) and value > 0, f"{section}.{key} = {value}"
    assert report["frozen"]["variants"] == [f"resultset{i}" for i in range(1, 8)]
    assert "gpu" not in report  # CUDA only
    assert [type(ok) for ok in report["targets"].values()] == [bool] * 4
    for section in KEYS:  # the printed table shows the same figures
        assert section in done.stdout

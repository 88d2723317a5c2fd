"""Hydra's Ray launcher (the `ray` extra) on a real Ray cluster: one head node on this machine.

The head is started as a user would start one by hand (`ray start --head`), with token
authentication on, and the sweep joins it through conf/hydra/launcher/ray_cluster.yaml: both jobs
run in Ray's worker processes, the report is written at the end, and a re-run of the same sweep
skips the finished jobs. Skipped where the extra is not installed (make install-ray).
"""

import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cxr.config import CONF_DIR
from tests.conftest import REPO

pytest.importorskip("hydra_plugins.hydra_ray_launcher")

# heads on a frozen backbone: what a launcher does with a job does not depend on what trains
SMOKE = ("debug=smoke", "model.freeze_backbone=true", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
TIMEOUT_S = 600
RAY = Path(sys.executable).with_name("ray")  # the venv's: its workers import the same cxr


def test_ray_presets_compose():
    """conf/hydra/launcher/ray_*.yaml extend hydra-ray-launcher's `ray` config; per-job resources
    come from the command line, a fractional GPU included (two jobs per GPU)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        local = compose("train", ["hydra/launcher=ray_local"], return_hydra_config=True)
        cluster = compose("train", ["hydra/launcher=ray_cluster", "hydra.launcher.ray.remote.num_gpus=0.5",
                                    "hydra.launcher.ray.init.address=ray://head:10001"],
                          return_hydra_config=True)
    for launcher in (local.hydra.launcher, cluster.hydra.launcher):
        assert launcher._target_.endswith("hydra_ray_launcher.ray_launcher.RayLauncher")
    assert local.hydra.launcher.ray.init.address == "local"  # a new instance, whatever RAY_ADDRESS says
    assert cluster.hydra.launcher.ray.init.address == "ray://head:10001"
    # hydra-ray-launcher's 75 MB default would make ray.init() refuse to join a cluster
    assert cluster.hydra.launcher.ray.init.object_store_memory is None
    assert cluster.hydra.launcher.ray.remote.num_gpus == 0.5


def test_issue20_item7_ray_local_sizes_each_job_from_this_machine():
    """ray_local's instance is this machine, and each job asks for what it has: no GPU where
    there is none (this CI machine), at most 4 CPUs and never more than the machine's."""
    import torch

    from cxr.config import machine_cpus

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        local = compose("train", ["hydra/launcher=ray_local"], return_hydra_config=True)
        packed = compose("train", ["hydra/launcher=ray_local", "jobs_per_gpu=2", "hydra.launcher.ray.init.num_gpus=1",
                                   "hydra.launcher.ray.init.num_cpus=1"], return_hydra_config=True)
    ray = local.hydra.launcher.ray
    assert ray.init.num_cpus == len(os.sched_getaffinity(0)) == machine_cpus()
    assert ray.init.num_gpus == torch.cuda.device_count()
    assert ray.remote.num_cpus == min(4, ray.init.num_cpus)
    assert ray.remote.num_gpus == (1 if torch.cuda.device_count() else 0)
    assert packed.hydra.launcher.ray.remote == {"num_cpus": 1, "num_gpus": 0.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    """The head's and the sweep's environment (the session's CXR_CACHE_DIR included)."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
        # Ray 2.60's token authentication, on for the head and the sweep alike; the token lives in
        # the environment only, never in ~/.ray/auth_token. A sweep that joins by an explicit
        # address uses a token only where RAY_AUTH_MODE says so.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # On Linux Ray replaces --node-ip-address=127.0.0.1 with the machine's reachable address;
        # with Ray's multi-node support off (a one-node cluster needs none) it stays on loopback
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Ray merges similar log lines of its workers ("[repeated 2x across cluster]"): keep each
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # ports Ray would otherwise take at fixed numbers, free ones so that two heads may coexist
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
    }


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with 2 CPUs: (its GCS address, the environment that joins it).

    `ray start --block` in its own session, stopped at the end by SIGTERM (it then stops every
    process it started) and, should it hang, by SIGKILL to its process group: only this head goes,
    where `ray stop` would stop every Ray on the machine. Its own temp dir (short: Ray's socket
    paths must fit in 107 bytes) keeps /tmp/ray/ray_current_cluster from naming a stopped head.
    """
    env, port = ray_env(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="cxr-ray-")
    log = tmp_path / "ray-head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", "--include-dashboard=false",
             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no Ray head after 120 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def result_stamps(sweep_dir: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(sweep_dir.glob("*/result.json"))}


@pytest.mark.slow
def test_ray_cluster_sweep_runs_on_the_cluster_and_a_rerun_skips_finished_jobs(ray_head, tmp_path):
    address, env = ray_head
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "cxr.train", "-m", "hydra/launcher=ray_cluster",
               f"hydra.launcher.ray.init.address={address}",
               # both jobs side by side on the head's 2 CPUs, without a GPU
               "hydra.launcher.ray.remote.num_cpus=1", "hydra.launcher.ray.remote.num_gpus=0",
               *SMOKE, "seed=0,1", f"hydra.sweep.dir={sweep_dir}"]

    def sweep() -> str:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-6000:]}"
        return proc.stdout

    output = sweep()
    assert f"Connecting to existing Ray cluster at address: {address}" in output
    # each job logged from a Ray worker process ("(_run_job pid=N)" prefixes what Ray relays)
    assert output.count("(_run_job pid=") >= 2, output[-4000:]
    with (sweep_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))]
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert sorted(r["seed"] for r in results) == [0, 1]
    stamps = result_stamps(sweep_dir)

    output = sweep()  # the same sweep again: nothing left to do
    assert output.count("already finished") == 2, output[-4000:]
    assert result_stamps(sweep_dir) == stamps


@pytest.mark.slow
def test_issue20_item7_ray_local_sweep_runs_on_a_machine_without_a_gpu(tmp_path):
    """The preset as it is, on this 2-core machine without a GPU: before, each job asked for a GPU
    and 4 CPUs and stayed pending for ever."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "cxr.train", "-m", "hydra/launcher=ray_local", *SMOKE, "seed=0,1",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, env={**ray_env(), "RAY_AUTH_MODE": "disabled"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-6000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/result.json"))]
    assert [r["status"] for r in results] == ["ok", "ok"]


@pytest.mark.slow
def test_issue20_item7_a_ray_sweep_whose_jobs_cannot_start_fails_in_one_line(tmp_path):
    """A job asking for a GPU on a Ray instance without one: exit 1 within a minute, one line
    naming the key to set, no traceback, nothing started."""
    sweep_dir = tmp_path / "sweep"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cxr.train", "-m", "hydra/launcher=ray_local",
                           "hydra.launcher.ray.init.num_gpus=0", "hydra.launcher.ray.remote.num_gpus=1", *SMOKE,
                           "seed=0,1", f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, env=ray_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if line.startswith("error: ")]
    assert line.endswith("set hydra.launcher.ray.remote.num_gpus=0"), output
    assert not sweep_dir.exists()

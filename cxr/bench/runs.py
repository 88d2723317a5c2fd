"""How the suites build what they time, through the trainer's own code so that they cannot drift
from it: configs composed and validated as `python -m cxr.train` composes them, a run's training
built by `cxr.training.build_training` on a runtime from `cxr.runtime.start` (scheduler, gradient
accumulation and `pos_weight` included), and sweeps started as a user starts them, in a subprocess.
"""

import contextlib
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cxr import results
from cxr.config import CONF_DIR, effective, register_configs, validate
from cxr.decoding import Split
from cxr.runtime import Runtime, start
from cxr.task import Task
from cxr.training import Training, build_training

REPO = Path(CONF_DIR).parent
WHOLE, HEAD = "whole network", "head on frozen features"
STOP_GRACE_S = 15.0  # a sweep past its time: how long its jobs get to stop on SIGTERM before SIGKILL


def compose_train(overrides: list[str]):
    """conf/train.yaml with `overrides`, as `python -m cxr.train` composes and checks it: an
    unknown key or an out-of-range value raises (Hydra's error, or cxr.config.ConfigError)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    validate(cfg)
    return effective(cfg)


def trainable(cfg) -> str:
    """What a run of `cfg` trains, in words for the JSON."""
    return HEAD if cfg.model.freeze_backbone else WHOLE


def head_variants() -> list[str]:
    """The reference's head variants: conf/experiment/resultset*.yaml."""
    return sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("resultset*.yaml"))


def sized(split: Split, count: int) -> Split:
    """`count` images of the split, its images (and paths) repeated as often as needed."""
    copies = math.ceil(count / len(split))
    return Split(split.images.repeat(copies, 1, 1, 1)[:count], split.labels.repeat(copies)[:count],
                 (split.paths * copies)[:count])


class Fed:
    """A training view's `prepare`, counting the images it prepares: what the module was fed."""

    def __init__(self, prepare):
        self.prepare, self.images = prepare, 0

    def __call__(self, x: torch.Tensor, augment) -> torch.Tensor:
        self.images += len(x)
        return self.prepare(x, augment)


@dataclass
class TrainerEpoch:
    """One epoch of a run's training per call, exactly as cxr.train runs one (Training.train_epoch);
    a call returns the number of images its module was fed."""

    training: Training
    module: torch.nn.Module  # the view's module, compiled if asked (Runtime.wrap)
    cfg: object
    runtime: Runtime
    fed: Fed
    epochs: itertools.count

    def __call__(self) -> int:
        before = self.fed.images
        self.training.train_epoch(self.module, next(self.epochs), self.cfg, self.runtime)
        return self.fed.images - before


def trainer_epoch(cfg, split: Split, classes: list[str], compile_model: bool = False) -> TrainerEpoch:
    """The run `cfg` describes, trained on `split` (it is also the validation and test split: only
    training is timed), built by cxr.training on the runtime cxr.runtime.start gives."""
    runtime = start(cfg.trainer, cfg.seed, cfg.jobs_per_gpu)
    split = split.to(runtime.device)
    training = build_training(cfg, [split, split, split], Task.of_labels(classes, split.labels), runtime)
    fed = Fed(training.view.prepare)
    training.view.prepare = fed
    module = runtime.wrap(training.view.module, compile_model)
    return TrainerEpoch(training, module, cfg, runtime, fed, itertools.count(1))


def run_sweep(overrides: list[str], sweep_dir: Path, timeout_s: float | None = None) -> tuple[float, str | None]:
    """A real multirun as a user starts it (`python -m cxr.train -m ...`), in a subprocess whose
    output goes to sweep_dir/multirun.log: its wall seconds, and None, or why it was cut short.

    It runs in a session of its own, so that past `timeout_s` its launcher's workers are stopped
    with it (stop_session)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cxr.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    with open(sweep_dir / "multirun.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_session(process)
            return time.perf_counter() - started, f"stopped after {timeout_s:.0f} s: the time budget ran out"
    return time.perf_counter() - started, None


def stop_session(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process of the session `process` leads (a job so stopped keeps its last.pt
    and says so in its result.json), once all have ended; SIGKILL to any left after `grace_s`."""
    os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reaps the leader: a zombie would keep the group alive
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def sweep_jobs(sweep_dir: Path) -> list[tuple[str, dict | None]]:
    """Each job folder of a sweep (in job order) and its result record (None: it wrote none)."""
    jobs = sorted((job for job in sweep_dir.glob("*_*") if job.is_dir()), key=lambda job: int(job.name.split("_")[0]))
    return [(job.name, results.read(job)) for job in jobs]


def job_errors(jobs: list[tuple[str, dict | None]], expected: int) -> dict[str, str]:
    """Each job that did not end ok and the one line that says why (from its result.json), and
    the jobs that never got a folder."""
    errors = {name: (record.get("error") or record.get("status")) if record else
              f"no {results.RESULT_FILE}: the job's log in its folder says why"
              for name, record in jobs if not record or record.get("status") != results.OK}
    if len(jobs) < expected:
        errors["(not started)"] = f"{expected - len(jobs)} job(s) never started"
    return errors

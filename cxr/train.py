"""`python -m cxr.train`: fine-tune ResNet50 on chest X-rays, pick the epoch on validation, test once.

`main` is the thin @hydra.main shell; `run(cfg, output_dir)` is a plain function that tests call
directly and that writes everything into `output_dir`:

    result.json           status, config summary, metrics, times (cxr.results)
    best.pt, last.pt      the best epoch by trainer.monitor, and the resumable latest epoch (cxr.checkpoint)
    events.out.tfevents*  TensorBoard: train/*, val/* per epoch, test/* once, HParams (cxr.tensorboard)
"""

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cxr import results
from cxr.arrays import DiskFull
from cxr.batches import epoch_augment
from cxr.calibration import CALIBRATIONS
from cxr.checkpoint import BEST, LAST, CheckpointError, Checkpoints, config_changes, fingerprint
from cxr.config import (
    CONF_DIR,
    ConfigError,
    effective,
    machine_cpus,
    machine_gpus,
    ray_unschedulable,
    register_configs,
    validate,
)
from cxr.data import DataError, load_dataset
from cxr.engine import MONITORS, NonFiniteLossError, TrainingState, evaluate, predict_logits
from cxr.model import WeightsError
from cxr.runtime import DeviceError, Runtime, StopSignals, claim_gpu_slot, cpu_threads, device_name, slot_device, start
from cxr.schedule import scheduled_lr
from cxr.task import Task
from cxr.tensorboard import RunBoard, hparams_of
from cxr.training import Training, build_training

log = logging.getLogger("cxr")


class Interrupted(Exception):
    """SIGINT/SIGTERM: last.pt of the last finished epoch is kept; the run can be resumed."""


class RunDirError(Exception):
    """A fresh run asked to write into a folder that holds another run."""


class ChangedConfigError(RunDirError):
    """A resumed run (a sweep's re-run) found a finished run of another config in its folder."""


# mistakes a user can make and fix: reported in one line, never as a traceback
USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, NonFiniteLossError,
               DeviceError, DiskFull, torch.OutOfMemoryError)


def run(cfg, output_dir: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Train, choose the best epoch and threshold on validation, test once, write result.json.

    Returns the result record (status ok). User mistakes raise one of USER_ERRORS; `run_safely`
    turns any failure into a result.json with status failed.
    """
    started = time.perf_counter()
    validate(cfg)
    cfg = effective(cfg)
    runtime = start(cfg.trainer, cfg.seed, cfg.jobs_per_gpu)
    output_dir = Path(runtime.shared(str(output_dir)))  # rank 0's Hydra dir is the real one
    record = results.new_record(cfg, overrides)
    record.update(device=device_name(runtime.device), world_size=runtime.world)

    dataset = load_dataset(cfg.data)
    record["data"].update(results.data_summary(dataset))
    task = dataset.task
    training = build_training(cfg, (dataset.train, dataset.val, dataset.test), task, runtime)
    model, view, scheduler = training.model, training.view, training.scheduler
    checkpoints = Checkpoints(output_dir, model, training.optimizer, scheduler, runtime, cfg, task, dataset.index())
    record["fingerprint"] = checkpoints.fingerprint  # what a re-run compares (see stale_result)

    state = resume_or_start(checkpoints, cfg)
    board = RunBoard(output_dir, state.epoch + 1, runtime.is_main)
    if state.epoch == 0 and cfg.trainer.tensorboard_images:  # as epoch 1 sees them, augmented
        augment = epoch_augment(cfg.data.augment, cfg.data.hflip, cfg.seed, 1, runtime.device)
        board.input_grid(dataset.train.images[:32].to(runtime.device), task, dataset.train.labels[:32], augment)
    if state.epoch > 0:  # resuming purged the events from step epoch+1 on: the earlier steps' lrs too
        earlier_steps = range(state.epoch, state.epoch * training.epoch_steps)
        board.learning_rates([scheduled_lr(scheduler, i) for i in earlier_steps], first_step=state.epoch + 1)
    trained = runtime.wrap(view.module, cfg.trainer.compile)
    with cpu_threads(view.cpu_threads, runtime.device):
        fit(trained, training, checkpoints, state, board, cfg, runtime)
        calibrated = calibrate(trained, training, checkpoints, cfg, runtime)
        test_logits, labels = split_logits(trained, training, view.test, cfg, runtime)
    probs = task.probabilities(torch.from_numpy(test_logits), calibrated.temperature).numpy()
    complete(record, state, calibrated.threshold, task.mean_loss(probs, labels), probs, labels, task, cfg)
    record["calibration"] = calibration_summary(calibrated, test_logits, labels, task, cfg)
    if runtime.is_main:  # per image, for analyses the summary metrics cannot answer
        results.write_test_predictions(output_dir, dataset.test.paths, probs, labels, calibrated.threshold, task)
    record["time"] = {"train_ms": round(state.train_ms), "total_ms": round((time.perf_counter() - started) * 1000)}
    record["gpu_memory_mb"] = runtime.gpu_memory_mb()
    if runtime.is_main:
        report(record, board, model, dataset.test, probs, labels, task, cfg, output_dir)
        if not cfg.trainer.keep_last:  # a finished run needs best.pt only, unless it is to be extended
            checkpoints.remove_last()
    return record


def resume_or_start(checkpoints: Checkpoints, cfg) -> TrainingState:
    """last.pt's state with trainer.resume=true (an interrupted run, or one extended by more
    epochs), else a fresh state."""
    if not cfg.trainer.resume:
        return TrainingState()
    if checkpoints.last_path.exists():
        return checkpoints.resume()
    # a sweep resumes every job: a fresh job folder (or one whose run failed before training) is
    # no news, a folder holding a trained epoch's best.pt without last.pt is
    if checkpoints.best_path.exists():
        log.warning("trainer.resume=true but %s holds %s and no %s: starting from epoch 1",
                    checkpoints.best_path.parent, BEST, LAST)
    return TrainingState()


def fit(module, training: Training, checkpoints: Checkpoints, state: TrainingState, board: RunBoard, cfg,
        runtime: Runtime) -> None:
    """Epochs state.epoch+1 .. trainer.epochs: train, validate, keep last.pt and the best epoch;
    with trainer.patience, stop once trainer.monitor has not improved for that many epochs."""
    trainer, task, view = cfg.trainer, training.task, training.view
    sign = MONITORS[trainer.monitor]
    if state.epoch == 0:  # the state before any training: a run stopped in epoch 1 resumes from here
        checkpoints.save_last(state)
    if state.stopped_epoch is not None:  # resumed after early stopping: only the test is left
        return
    with StopSignals() as stop:
        def stop_signal() -> str | None:  # every rank asks at the same points: they stop together
            return runtime.agreed_stop(stop.received)

        for epoch in range(state.epoch + 1, trainer.epochs + 1):
            epoch_start = time.perf_counter()
            train = training.train_epoch(module, epoch, cfg, runtime, progress=trainer.progress and runtime.is_main,
                                         should_stop=lambda: stop_signal() is not None)
            raise_if_stopped(stop_signal(), state, checkpoints)
            lrs = train.pop("lrs")
            board.learning_rates(lrs, first_step=training.scheduler.last_epoch - len(lrs) + 1)
            val_loss, val_probs, val_labels = evaluate(
                module, view.eval_inputs(view.val, trainer.eval_batch_size, runtime.rank, runtime.world), task,
                device=runtime.device)
            threshold = task.choose_threshold(trainer.threshold, val_labels, val_probs)
            row = results.epoch_row(epoch, train, val_loss, task.metrics(val_labels, val_probs, threshold))
            improved = state.advance(row, sign * row[trainer.monitor], threshold,
                                     (time.perf_counter() - epoch_start) * 1000)
            log.info("epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %.3f%s",
                     epoch, trainer.epochs, row["train/loss"], row["train/acc"], val_loss,
                     row["val/acc"], row["val/auroc"], "  *best*" if improved else "")
            board.epoch(row)
            if epoch < trainer.epochs and state.patience_spent(trainer.patience):
                state.stopped_epoch = epoch
                log.info("stopping after epoch %d: %s has not improved for %d epoch(s) since epoch %d",
                         epoch, trainer.monitor, trainer.patience, state.best_epoch)
            checkpoints.save_last(state)  # last.pt first: stopped between the two, a resume rebuilds best.pt
            if improved:
                checkpoints.save_best(epoch, threshold)
            runtime.barrier()
            if state.stopped_epoch is not None:
                break
        raise_if_stopped(stop_signal(), state, checkpoints)  # a signal during the last validation: no test


@dataclass
class Calibrated:
    """best.pt after trainer.calibration: its threshold and temperature (None: none), and with a
    temperature, the best epoch's validation logits, labels and threshold before calibrating."""

    threshold: float | list[float]
    temperature: float | list[float] | None = None
    val_logits: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    uncalibrated_threshold: float | list[float] | None = None


def split_logits(module, training: Training, split, cfg, runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """The logits and labels of a whole split (validation or test), gathered from all ranks."""
    inputs = training.view.eval_inputs(split, cfg.trainer.eval_batch_size, runtime.rank, runtime.world)
    return predict_logits(module, inputs, device=runtime.device)


def calibrate(module, training: Training, checkpoints: Checkpoints, cfg, runtime: Runtime) -> Calibrated:
    """best.pt's weights into the model, and its threshold. With trainer.calibration=temperature,
    a temperature fitted on the best epoch's validation logits (cxr.calibration), and the
    threshold chosen again by trainer.threshold on the calibrated validation probabilities:
    scaling is monotone, so the threshold falls between the same validation images and every
    image is decided as before. Both are stored in best.pt, for cxr.predict."""
    threshold = checkpoints.load_best()
    fit_temperature = CALIBRATIONS[cfg.trainer.calibration]
    if fit_temperature is None:
        return Calibrated(threshold)
    task = training.task
    logits, labels = split_logits(module, training, training.view.val, cfg, runtime)
    temperature = fit_temperature(logits, labels, task)
    calibrated, uncalibrated = (task.probabilities(torch.from_numpy(logits), t).numpy() for t in (temperature, None))
    threshold = task.choose_threshold(cfg.trainer.threshold, labels, calibrated)
    checkpoints.save_calibration(threshold, temperature)
    return Calibrated(threshold, temperature, logits, labels,
                      task.choose_threshold(cfg.trainer.threshold, labels, uncalibrated))


def calibration_summary(calibrated: Calibrated, test_logits: np.ndarray, test_labels: np.ndarray, task: Task,
                        cfg) -> dict:
    """result.json's `calibration`: the temperature, and the validation and test split's
    calibration and AUROC before it (at the threshold chosen before it) and after it."""
    if calibrated.temperature is None:
        return results.calibration_record(cfg.trainer.calibration, None, {}, {})
    before, after = {}, {}
    for split, logits, labels in (("val", calibrated.val_logits, calibrated.val_labels),
                                  ("test", test_logits, test_labels)):
        for values, temperature, threshold in ((before, None, calibrated.uncalibrated_threshold),
                                               (after, calibrated.temperature, calibrated.threshold)):
            probs = task.probabilities(torch.from_numpy(logits), temperature).numpy()
            values.update(results.split_metrics(split, task.mean_loss(probs, labels),
                                                task.metrics(labels, probs, threshold)))
    log.info("calibration: temperature %s; validation nll %.4f -> %.4f, ece %.4f -> %.4f",
             task.format_values(calibrated.temperature), before["val/nll"], after["val/nll"],
             before["val/ece"], after["val/ece"])
    return results.calibration_record(cfg.trainer.calibration, calibrated.temperature, before, after)


def raise_if_stopped(stop_signal: str | None, state: TrainingState, checkpoints: Checkpoints) -> None:
    if stop_signal is not None:
        held = f"epoch {state.epoch}" if state.epoch else "the state before training"
        run_dir = checkpoints.last_path.parent
        raise Interrupted(f"stopped by {stop_signal}; {checkpoints.last_path} holds {held}; continue "
                          f"with trainer.resume=true hydra.run.dir={run_dir} (a sweep: re-run it into "
                          "the same hydra.sweep.dir)")


def complete(record: dict, state: TrainingState, threshold: float, test_loss: float, probs: np.ndarray,
             labels: np.ndarray, task: Task, cfg) -> None:
    """The record of a finished run: the best epoch's train/val metrics, the test split's once."""
    best_row = state.history[state.best_epoch - 1]
    tested = results.tested(task, labels, probs, threshold, test_loss, cfg.trainer.bootstrap)
    for warning in tested["warnings"]:
        log.warning("%s: the model has not learned to tell the classes apart", warning)
    record.update(tested, status=results.OK, best_epoch=state.best_epoch, stopped_epoch=state.stopped_epoch,
                  metrics={**{k: v for k, v in best_row.items() if k != "epoch"}, **tested["metrics"]},
                  history=state.history, hparams=hparams_of(cfg))


def report(record: dict, board: RunBoard, model, test_split, probs: np.ndarray, labels: np.ndarray,
           task: Task, cfg, output_dir: Path) -> None:
    """TensorBoard's test scalars, HParams and figures, result.json, and the closing log line."""
    metrics = record["metrics"]
    step = cfg.trainer.epochs
    board.test(metrics, step)
    board.hparams(record["hparams"], metrics)
    if cfg.trainer.tensorboard_images:
        board.test_figures(labels, probs, record["confusion"], task, step)
        board.gradcam(model, test_split.images, labels, probs, task, step)
    board.close()
    record["checkpoint"] = str(output_dir / BEST)
    results.write(output_dir, record)
    threshold = record["threshold"]
    log.info("test acc %.4f (majority class %.4f)  balanced acc %.4f  auroc %.4f  sensitivity %.4f  "
             "specificity %.4f  [best epoch %d, threshold %s]  %s", metrics["test/acc"], record["majority_rate"],
             metrics["test/balanced_acc"], metrics["test/auroc"], metrics["test/sensitivity"],
             metrics["test/specificity"], record["best_epoch"],
             task.format_values(threshold), output_dir)


def used_run_dir(output_dir: Path) -> str | None:
    """Why a fresh run must not write into `output_dir` (it holds another run), or None."""
    held = [name for name in (results.RESULT_FILE, LAST, BEST) if (Path(output_dir) / name).exists()]
    if not held:
        return None
    return (f"{output_dir} already holds a run ({', '.join(held)}); pass trainer.resume=true to continue "
            "it, or choose another hydra.run.dir")


def stale_result(previous: dict, cfg) -> str | None:
    """Why a finished run's result.json does not answer `cfg` (its config differs), or None."""
    if "fingerprint" not in previous:
        return "result.json has no config fingerprint to compare (an older cxr wrote it)"
    saved, current = previous["fingerprint"], fingerprint(effective(cfg))
    changed = config_changes(saved, current)
    if not changed:
        return None
    shown = ", ".join(f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:3])
    return f"config differs: {shown}{f' (+{len(changed) - 3} more)' if len(changed) > 3 else ''}"


def clear_run(output_dir: Path) -> None:
    """Remove a run's files from its folder (Hydra's .hydra/ and the log stay)."""
    for path in [*(output_dir / name for name in (results.RESULT_FILE, results.PREDICTIONS_FILE, BEST, LAST)),
                 *output_dir.glob("events.out.tfevents.*")]:
        path.unlink(missing_ok=True)


def finished(previous: dict | None, cfg, output_dir: Path) -> bool:
    """Whether a resumed run (a sweep's re-run) is already done: its folder holds a finished run of
    this config and epochs. A finished run of another config is refused (ChangedConfigError), or
    with trainer.rerun_changed=true cleared away to run again; never reused."""
    if not (cfg.trainer.resume and previous and previous.get("status") == results.OK):
        return False
    if stale := stale_result(previous, cfg):
        if not cfg.trainer.rerun_changed:
            raise ChangedConfigError(f"{output_dir} holds a finished run whose {stale}; pass "
                                     "trainer.rerun_changed=true to re-run it with this config, or use "
                                     "another hydra.sweep.dir (hydra.run.dir)")
        log.warning("re-running %s (trainer.rerun_changed=true): its %s", output_dir, stale)
        clear_run(output_dir)
        return False
    if cfg.trainer.epochs <= previous.get("epochs", 0):
        log.info("already finished: %s (status ok), skipping", output_dir / results.RESULT_FILE)
        return True
    if not (output_dir / LAST).exists():
        raise RunDirError(f"{output_dir} holds a finished run without {LAST}: only a run made with "
                          "trainer.keep_last=true can be extended by more epochs")
    return False


def run_safely(cfg, output_dir: Path, overrides: list[str]) -> dict:
    """run(), with every outcome written to result.json: ok, skipped (already ok), or failed.

    A fresh run into a folder that holds another run raises RunDirError and writes nothing, and so
    does a resumed one into a folder holding a finished run of another config (ChangedConfigError).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    previous = results.read(output_dir)
    if not cfg.trainer.resume and (problem := used_run_dir(output_dir)):
        raise RunDirError(problem)
    if finished(previous, cfg, output_dir):
        return previous
    try:
        return run(cfg, output_dir, overrides)
    except (*USER_ERRORS, Interrupted) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        status = results.INTERRUPTED if isinstance(error, Interrupted) else results.FAILED
        log.error("%s: %s", status, message)
        record = write_failure(cfg, output_dir, overrides, status, message)
        if isinstance(error, Interrupted) and torch.distributed.is_initialized():
            # every rank stopped at the same step: they leave once rank 0 has written result.json
            # (torchrun stops the other ranks as soon as one of them ends)
            torch.distributed.barrier()
        return record
    except Exception as error:  # a bug: keep the traceback in the log, the one line in result.json
        log.exception("failed")
        return write_failure(cfg, output_dir, overrides, results.FAILED, f"{type(error).__name__}: {error}")


def write_failure(cfg, output_dir: Path, overrides, status: str, message: str) -> dict:
    record = results.failure_record(cfg, overrides, status, message)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        results.write(output_dir, record)
    return record


class RunDirGuard(Callback):
    """Registered in conf/train.yaml: refuses a fresh single run into a folder holding another run
    before Hydra writes anything there (its .hydra/ files would overwrite the first run's)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not config.trainer.resume and (problem := used_run_dir(Path(config.hydra.run.dir))):
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(1)


class RayResourceCheck(Callback):
    """Registered in conf/train.yaml: a sweep on a Ray instance of its own (hydra/launcher=ray_local)
    whose jobs ask for more than the instance has stops at once with one line saying what to set,
    where Ray would keep the jobs pending for ever."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.launcher
        if not launcher.get("_target_", "").endswith("RayLauncher") or launcher.ray.init.get("address") != "local":
            return  # (a running cluster may grow: what it has now does not decide)
        init = launcher.ray.init
        instance = {"num_cpus": machine_cpus() if init.get("num_cpus") is None else init.num_cpus,
                    "num_gpus": machine_gpus() if init.get("num_gpus") is None else init.num_gpus}
        if problem := ray_unschedulable(launcher.ray.remote, instance):
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(1)


def job_config(cfg: DictConfig, hydra_cfg) -> DictConfig:
    """The config a job runs with: as composed, except that a multirun job resumes (a sweep re-run
    skips finished jobs and continues interrupted ones) and takes the GPU of its process's slot."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cfg
    device, gpus = cfg.trainer.device, torch.cuda.device_count()
    # (under torchrun, LOCAL_RANK picks the GPU; with one GPU there is nothing to choose)
    if "LOCAL_RANK" not in os.environ and gpus > 1:
        device = slot_device(device, claim_gpu_slot(), gpus)
    return OmegaConf.merge(cfg, {"trainer": {"resume": True, "device": device}})


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        result = run_safely(job_config(cfg, hydra_cfg), Path(hydra_cfg.runtime.output_dir),
                            list(hydra_cfg.overrides.task))
    except RunDirError as error:  # nothing was written: the folder's run stays as it was
        log.error("%s", error)
        if multirun and not isinstance(error, ChangedConfigError):
            return None  # the other jobs go on; the report shows this job's files as they are
        # a finished run of another config stops the sweep: its report would show that run's
        # numbers beside this config's jobs
        sys.exit(1)
    if result["status"] == results.INTERRUPTED or (result["status"] != results.OK and not multirun):
        # one line already logged; finished files stay on disk. A signal stops a sweep too: its
        # re-run skips the finished jobs and resumes this one.
        sys.exit(130 if result["status"] == results.INTERRUPTED else 1)
    # the Optuna sweeper maximises what the task returns: validation AUROC, never a test metric.
    # None where there is none (a failed job, a one-class validation split): Optuna records that
    # trial as failed and goes on, where NaN would stop the whole search (optuna 2.10's tell()).
    value = result["metrics"].get("val/auroc")
    return None if value is None or math.isnan(value) else float(value)


if __name__ == "__main__":
    # Run the `main` of the importable module cxr.train, not of this __main__ copy: launchers
    # that send the task to other processes (joblib, submitit) pickle a function of __main__
    # by value, and torch's module objects it reaches cannot be pickled; by name they can.
    from cxr.train import main as importable_main

    importable_main()

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
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cxr import results
from cxr.batches import epoch_augment
from cxr.checkpoint import BEST, LAST, CheckpointError, Checkpoints, config_changes, fingerprint
from cxr.config import CONF_DIR, ConfigError, effective, register_configs, validate
from cxr.data import DataError, load_dataset
from cxr.engine import MONITORS, NonFiniteLossError, TrainingState, evaluate
from cxr.model import WeightsError
from cxr.runtime import DeviceError, Runtime, StopSignals, cpu_threads, device_name, start, sweep_job_device
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
               DeviceError, torch.OutOfMemoryError)


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
    splits = [split.to(runtime.device) for split in (dataset.train, dataset.val, dataset.test)]

    task = dataset.task
    training = build_training(cfg, splits, task, runtime)
    model, view, scheduler = training.model, training.view, training.scheduler
    checkpoints = Checkpoints(output_dir, model, training.optimizer, scheduler, runtime, cfg, task, dataset.index())
    record["fingerprint"] = checkpoints.fingerprint  # what a re-run compares (see stale_result)

    state = resume_or_start(checkpoints, cfg)
    board = RunBoard(output_dir, state.epoch + 1, runtime.is_main)
    if state.epoch == 0 and cfg.trainer.tensorboard_images:  # as epoch 1 sees them, augmented
        augment = epoch_augment(cfg.data.augment, cfg.data.hflip, cfg.seed, 1, runtime.device)
        board.input_grid(splits[0].images[:32], task, splits[0].labels[:32], augment)
    if state.epoch > 0:  # resuming purged the events from step epoch+1 on: the earlier steps' lrs too
        earlier_steps = range(state.epoch, state.epoch * training.epoch_steps)
        board.learning_rates([scheduled_lr(scheduler, i) for i in earlier_steps], first_step=state.epoch + 1)
    trained = runtime.wrap(view.module, cfg.trainer.compile)
    with cpu_threads(view.cpu_threads, runtime.device):
        fit(trained, training, checkpoints, state, board, cfg, runtime)
        threshold = checkpoints.load_best()
        test_loss, probs, labels = evaluate(trained, view.eval_inputs(view.test, cfg.trainer.eval_batch_size,
                                                                      runtime.rank, runtime.world),
                                            task, device=runtime.device, amp_dtype=runtime.amp_dtype)
    complete(record, state, threshold, test_loss, probs, labels, task, cfg)
    if runtime.is_main:  # per image, for analyses the summary metrics cannot answer
        write_test_predictions(output_dir, dataset.test.paths, probs, labels, threshold, task)
    record["time"] = {"train_ms": round(state.train_ms), "total_ms": round((time.perf_counter() - started) * 1000)}
    record["peak_gpu_memory_mb"] = runtime.peak_memory_mb()
    if runtime.is_main:
        report(record, board, model, splits[2], probs, labels, task, cfg, output_dir)
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
        for epoch in range(state.epoch + 1, trainer.epochs + 1):
            epoch_start = time.perf_counter()
            train = training.train_epoch(module, epoch, cfg, runtime, progress=trainer.progress and runtime.is_main,
                                         should_stop=lambda: stop.received is not None)
            raise_if_stopped(stop, state, checkpoints)
            lrs = train.pop("lrs")
            board.learning_rates(lrs, first_step=training.scheduler.last_epoch - len(lrs) + 1)
            val_loss, val_probs, val_labels = evaluate(
                module, view.eval_inputs(view.val, trainer.eval_batch_size, runtime.rank, runtime.world), task,
                device=runtime.device, amp_dtype=runtime.amp_dtype)
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
        raise_if_stopped(stop, state, checkpoints)  # a signal during the last validation: no test


def raise_if_stopped(stop: StopSignals, state: TrainingState, checkpoints: Checkpoints) -> None:
    if stop.received is not None:
        held = f"epoch {state.epoch}" if state.epoch else "the state before training"
        run_dir = checkpoints.last_path.parent
        raise Interrupted(f"stopped by {stop.received}; {checkpoints.last_path} holds {held}; continue "
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


def write_test_predictions(output_dir: Path, paths: list[str], probs: np.ndarray, labels: np.ndarray,
                           threshold: float, task: Task) -> None:
    decisions = task.decide(probs, threshold)
    rows = [task.prediction_row(path, p, d, truth=y) for path, p, d, y in zip(paths, probs, decisions, labels,
                                                                               strict=True)]
    results.write_predictions(rows, task.prediction_columns(with_truth=True), output_dir / results.PREDICTIONS_FILE)


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
             task.format_threshold(threshold), output_dir)


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
        return write_failure(cfg, output_dir, overrides, status, message)
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


def job_config(cfg: DictConfig, hydra_cfg) -> DictConfig:
    """The config a job runs with: as composed, except that a multirun job resumes (a sweep re-run
    skips finished jobs and continues interrupted ones) and takes its GPU by job number."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cfg
    device = cfg.trainer.device
    if "LOCAL_RANK" not in os.environ:  # (under torchrun, LOCAL_RANK picks the GPU)
        device = sweep_job_device(device, hydra_cfg.job.num, torch.cuda.device_count(), cfg.jobs_per_gpu)
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

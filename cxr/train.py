"""`python -m cxr.train`: fine-tune ResNet50 on chest X-rays, pick the epoch on validation, test once.

`main` is the thin @hydra.main shell; `run(cfg, output_dir)` is a plain function that tests call
directly and that writes everything into `output_dir`:

    result.json           status, config summary, metrics, times (the file the aggregator reads)
    best.pt, last.pt      the best epoch by trainer.monitor, and the resumable latest epoch
    events.out.tfevents*  TensorBoard: train/*, val/* per epoch, test/* once, hparams
"""

import json
import logging
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from cxr import figures
from cxr.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cxr.config import ConfigError, validate
from cxr.data import MEAN, STD, DataError, eval_batches, load_dataset, preprocess, train_batches
from cxr.engine import NonFiniteLossError, evaluate, train_one_epoch
from cxr.features import cached_features
from cxr.metrics import bootstrap_intervals, choose_threshold, classification_metrics, majority_rate
from cxr.model import WeightsError, build_model

log = logging.getLogger("cxr")

RESULT_FILE = "result.json"
# mistakes a user can make and fix: reported in one line, never as a traceback
USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, NonFiniteLossError,
               torch.OutOfMemoryError)
# config keys that may change between a run and its resumption
RESUMABLE_CHANGES = {"trainer.resume", "trainer.epochs", "trainer.progress", "trainer.device",
                     "trainer.log_every", "trainer.eval_batch_size", "trainer.bootstrap",
                     "trainer.tensorboard_images", "data.cache_dir", "data.decode_workers", "data.root"}


class Interrupted(Exception):
    """SIGINT/SIGTERM: last.pt of the last finished epoch is kept; the run can be resumed."""


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sweep_job_device(device: str, job_num: int, gpu_count: int) -> str:
    """trainer.device for job `job_num` of a multirun on a machine with `gpu_count` GPUs.

    Launchers that run jobs side by side (joblib, submitit_local) would start every job on GPU 0:
    job n takes GPU n mod gpu_count instead, so n_jobs = gpu_count gives each job its own GPU. An
    explicit cuda:N or cpu is kept.
    """
    if device in ("auto", "cuda") and gpu_count > 1:
        return f"cuda:{job_num % gpu_count}"
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """autocast dtype and GradScaler. auto: bf16 on GPUs that have it, else fp16 with a scaler.

    Never on the CPU unless asked: bf16 autocast on an AVX2 CPU is ~15x slower than fp32.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    # fused: one kernel updates every tensor, instead of ~10 small ops per tensor that each launch
    # a kernel (GPU) or wait for the threads of a parallel region (CPU: 4x faster head-only steps)
    fused = True if all(p.device.type in ("cpu", "cuda") for p in params) else None
    return optimizer(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                     fused=fused)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # set both ways: these are process-wide, and an earlier run() in this process must not leak
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # fixed input sizes: let cuDNN pick the fastest kernels once, unless results must not vary
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def init_distributed(device_cfg: str) -> tuple[int, int]:
    """(rank, world size); under torchrun joins the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    use_cuda = device_cfg != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_rank() != 0:  # every rank runs the same steps: rank 0 reports them, once
        log.setLevel(logging.WARNING)
    return dist.get_rank(), dist.get_world_size()


def flat_config(cfg) -> dict:
    def walk(node, prefix=""):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from walk(value, name + ".")
            else:
                yield name, value
    return dict(walk(OmegaConf.to_container(cfg, resolve=True)))


def run_summary(cfg, overrides: list[str]) -> dict:
    """The parts of result.json known before training (also written for failed runs)."""
    return {
        "status": "running", "error": None,
        "variant": cfg.variant, "description": cfg.description, "overrides": list(overrides),
        "model": {"dense": cfg.model.dense, "hidden_layers": cfg.model.hidden_layers,
                  "dropout": cfg.model.dropout, "pooling": cfg.model.pooling,
                  "weights": cfg.model.weights, "freeze_backbone": cfg.model.freeze_backbone},
        "optimizer": {"name": cfg.optimizer.name, "lr": cfg.optimizer.lr},
        "data": {"name": cfg.data.name, "image_size": cfg.data.image_size},
        "metrics": {}, "epochs": cfg.trainer.epochs, "best_epoch": None, "seed": cfg.seed,
        "device": None, "time": {},
    }


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    os.replace(tmp, path)


def _json_safe(value):
    """NaN (e.g. AUROC on a one-class split) is not JSON: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def read_result(output_dir: Path) -> dict | None:
    path = Path(output_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------
# The run


def run(cfg, output_dir: str | os.PathLike, overrides: list[str] = (), resume: bool | None = None) -> dict:
    """Train, choose the best epoch and threshold on validation, test once, write result.json.

    Returns the result dict (status ok). User mistakes raise one of USER_ERRORS; `run_safely`
    turns any failure into a result.json with status failed.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    validate(cfg)
    resume = cfg.trainer.resume if resume is None else resume
    rank, world = init_distributed(cfg.trainer.device)
    is_main = rank == 0
    if world > 1:  # every rank reads rank 0's checkpoints (its Hydra dir is the real one)
        shared = [str(output_dir)]
        dist.broadcast_object_list(shared, src=0)
        output_dir = Path(shared[0])
    result = run_summary(cfg, overrides)
    fingerprint = {k: v for k, v in flat_config(cfg).items() if k not in RESUMABLE_CHANGES}

    device = pick_device(cfg.trainer.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.index is not None:  # cuda:N: autocast, the bf16 check and cuDNN follow it, not GPU 0
        torch.cuda.set_device(device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    amp_dtype, scaler = amp_setup(cfg.trainer.amp, device)
    # torchrun's process count: the time and the global batch (world_size x batch_size) follow it
    result.update(device=device_name(device), world_size=world)

    dataset = load_dataset(cfg.data)
    result["data"].update(classes=dataset.classes, train=len(dataset.train), val=len(dataset.val),
                          test=len(dataset.test), skipped_files=len(dataset.skipped),
                          skipped=dataset.skipped, root=str(dataset.root))
    train_split, val_split, test_split = (s.to(device) for s in (dataset.train, dataset.val, dataset.test))
    positive = dataset.positive_index

    model = build_model(cfg.model, cfg.data.image_size, len(dataset.classes)).to(device)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    raw_model = model  # checkpoints hold the unwrapped model
    # What the trained module reads: the image splits or, with a frozen backbone, its features of
    # them, computed once and cached on disk, while only the head trains (checkpoints still hold
    # the whole model). The image splits stay for the input grid and Grad-CAM.
    fit_train, fit_val, fit_test = train_split, val_split, test_split
    if cfg.model.freeze_backbone:
        fit_train, fit_val, fit_test = cached_features(
            raw_model.backbone, (train_split, val_split, test_split), cfg, device, amp_dtype)
        model = raw_model.head
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.trainer.compile:
        model = torch.compile(model)

    # --- resume from last.pt --------------------------------------------------------------
    start_epoch, best_score, best_epoch, history, train_ms = 1, -math.inf, None, [], 0.0
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"

    def best_checkpoint(model_state: dict, epoch: int, threshold: float) -> dict:
        """best.pt: the weights and what cxr.predict needs to use them; nothing to resume from."""
        return {"model": model_state, "epoch": epoch, "threshold": threshold,
                "classes": dataset.classes, "image_size": cfg.data.image_size,
                "mean": list(MEAN), "std": list(STD),
                "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                "fingerprint": fingerprint}

    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        changed = sorted(k for k in set(fingerprint) | set(state["fingerprint"])
                         if fingerprint.get(k) != state["fingerprint"].get(k))
        if changed:
            raise CheckpointError(f"{last_path} was written by another config ({', '.join(changed[:5])} "
                                  "differ); resume with the same config or use a new run dir")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if cfg.trainer.deterministic and state["num_threads"] != torch.get_num_threads():
            # CPU kernels split their sums by thread: the same count gives the same numbers
            log.info("using %d CPU threads as before the interruption (not %d)",
                     state["num_threads"], torch.get_num_threads())
            torch.set_num_threads(state["num_threads"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        history, train_ms = state["history"], state["train_ms"]
        if is_main and best_epoch == state["epoch"] and _checkpoint_epoch(best_path) != best_epoch:
            # killed between writing last.pt and best.pt: last.pt's weights are the best ones
            save_checkpoint(best_checkpoint(state["model"], best_epoch, state["threshold"]),
                            best_path)
        log.info("resumed from %s at epoch %d", last_path, start_epoch)
    elif cfg.trainer.resume:
        log.warning("trainer.resume=true but there is no %s: starting from epoch 1 (to continue a "
                    "run, pass its folder as hydra.run.dir)", last_path)

    writer = SummaryWriter(str(output_dir), purge_step=start_epoch) if is_main else None
    if writer is not None and start_epoch == 1 and cfg.trainer.tensorboard_images:
        figures.log_input_grid(writer, preprocess(train_split.images[:32], False), dataset.classes,
                               train_split.labels[:32])

    def save_last(epoch: int, threshold: float | None) -> None:
        """last.pt: everything a resumed run needs to go on exactly as if never stopped."""
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "epoch": epoch, "threshold": threshold, "best_score": best_score,
                         "best_epoch": best_epoch, "history": history, "train_ms": train_ms,
                         "rng": rng_state(), "num_threads": torch.get_num_threads(),
                         "fingerprint": fingerprint,
                         "config": OmegaConf.to_container(cfg, resolve=True)}, last_path)

    stop_signal = install_signal_handlers()

    def stop_if_signalled() -> None:
        if stop_signal[0] is not None:  # history holds the epochs that last.pt holds
            held = f"epoch {len(history)}" if history else "the state before training"
            raise Interrupted(f"stopped by {stop_signal[0]}; {last_path} holds {held}; continue "
                              f"with trainer.resume=true hydra.run.dir={output_dir} (a sweep: "
                              "re-run it into the same hydra.sweep.dir)")

    if is_main and start_epoch == 1:
        # the state before any training: a run stopped during its first epoch resumes from here
        save_last(0, None)
    sign = -1.0 if cfg.trainer.monitor == "val/loss" else 1.0
    steps_per_epoch = math.ceil(math.ceil(len(train_split) / world) / cfg.trainer.batch_size)

    def inputs(x, augment=False):  # cached features are ready as they are; images are normalised
        if cfg.model.freeze_backbone:
            return x
        return preprocess(x, cfg.trainer.channels_last, augment)

    def batches(split, epoch):
        for x, labels in train_batches(split, cfg.trainer.batch_size, epoch, cfg.seed, rank, world):
            yield inputs(x, cfg.data.augment), labels

    def eval_inputs(split):
        for x, labels in eval_batches(split, cfg.trainer.eval_batch_size, rank, world):
            yield inputs(x), labels

    # --- the loop: train, validate, keep the best ---------------------------------------------
    for epoch in range(start_epoch, cfg.trainer.epochs + 1):
        epoch_start = time.perf_counter()
        train_stats = train_one_epoch(
            model, optimizer, batches(fit_train, epoch), device=device, epoch=epoch,
            amp_dtype=amp_dtype, scaler=scaler, grad_clip=cfg.trainer.grad_clip,
            log_every=cfg.trainer.log_every, total=steps_per_epoch,
            progress=cfg.trainer.progress and is_main, should_stop=lambda: stop_signal[0] is not None)
        stop_if_signalled()
        val_loss, val_probs, val_labels = evaluate(model, eval_inputs(fit_val), device=device, amp_dtype=amp_dtype)
        threshold = choose_threshold(cfg.trainer.threshold, val_labels, val_probs, positive)
        val_metrics = classification_metrics(val_labels, val_probs, threshold, positive)
        train_ms += (time.perf_counter() - epoch_start) * 1000
        row = {"epoch": epoch, "train/loss": train_stats["loss"], "train/acc": train_stats["acc"],
               "val/loss": val_loss, **{f"val/{k}": v for k, v in val_metrics.items() if k != "confusion"}}
        history.append(row)
        score = sign * row[cfg.trainer.monitor]
        # the first epoch always counts, so an undefined metric (AUROC on a one-class validation
        # split) still leaves a checkpoint to test; later epochs must beat a real number
        improved = best_epoch is None or (not math.isnan(score) and score > best_score)
        if improved:
            best_score, best_epoch = (-math.inf if math.isnan(score) else score), epoch
        log.info("epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f auroc %.3f%s",
                 epoch, cfg.trainer.epochs, row["train/loss"], row["train/acc"], val_loss,
                 row["val/acc"], row["val/auroc"], "  *best*" if improved else "")
        if is_main:
            for tag, value in row.items():
                if tag != "epoch" and value is not None and not math.isnan(value):
                    writer.add_scalar(tag, value, epoch)
            writer.flush()
            # last.pt first: stopped between the two writes, a resume rebuilds best.pt from it
            save_last(epoch, threshold)
            if improved:
                save_checkpoint(best_checkpoint(raw_model.state_dict(), epoch, threshold),
                                best_path)
        if world > 1:
            dist.barrier()
    stop_if_signalled()  # a signal during the last validation: stop before testing
    restore_signal_handlers(stop_signal)

    # --- test, once, with the checkpoint and threshold chosen on validation --------------------
    best = load_checkpoint(best_path, map_location=device)
    raw_model.load_state_dict(best["model"])
    threshold = best["threshold"]
    test_loss, test_probs, test_labels = evaluate(model, eval_inputs(fit_test), device=device, amp_dtype=amp_dtype)
    test_metrics = classification_metrics(test_labels, test_probs, threshold, positive)
    best_row = history[best_epoch - 1]
    metrics = {k: best_row[k] for k in best_row if k != "epoch"}
    metrics.update({"test/loss": test_loss, **{f"test/{k}": v for k, v in test_metrics.items() if k != "confusion"}})
    result.update(
        status="ok", metrics=metrics, best_epoch=best_epoch, threshold=threshold,
        confusion=test_metrics["confusion"], majority_rate=majority_rate(test_labels),
        intervals={f"test/{k}": v for k, v in bootstrap_intervals(
            test_labels, test_probs, threshold, positive, cfg.trainer.bootstrap, seed=0).items()},
        checkpoint=str(best_path), history=history,
        time={"train_ms": round(train_ms), "total_ms": round((time.perf_counter() - started) * 1000)},
    )
    if is_main:
        for key in ("test/loss", "test/acc", "test/auroc", "test/sensitivity", "test/specificity",
                    "test/balanced_acc", "test/precision", "test/f1"):
            if result["metrics"][key] is not None and not math.isnan(result["metrics"][key]):
                writer.add_scalar(key, result["metrics"][key], cfg.trainer.epochs)
        log_hparams(writer, cfg, result["metrics"])
        if cfg.trainer.tensorboard_images:
            figures.log_test_figures(writer, test_labels, test_probs, test_metrics["confusion"],
                                     dataset.classes, positive, cfg.trainer.epochs)
            figures.log_gradcam(writer, raw_model, test_split.images, test_labels, test_probs,
                                dataset.classes, positive, cfg.trainer.epochs)
        writer.close()
        write_json(output_dir / RESULT_FILE, result)
    log.info("test acc %.4f (majority class %.4f)  auroc %.4f  sensitivity %.4f  specificity %.4f  "
             "[best epoch %d, threshold %.3f]  %s", metrics["test/acc"], result["majority_rate"],
             metrics["test/auroc"], metrics["test/sensitivity"], metrics["test/specificity"],
             best_epoch, threshold, output_dir)
    return result


def _checkpoint_epoch(path: Path) -> int | None:
    return load_checkpoint(path)["epoch"] if path.exists() else None


def log_hparams(writer: SummaryWriter, cfg, metrics: dict) -> None:
    """HParams dashboard entry in this run's own event file (add_hparams would make a sub-run)."""
    hp = {"variant": cfg.variant, "model.dense": cfg.model.dense, "model.hidden_layers": cfg.model.hidden_layers,
          "model.dropout": cfg.model.dropout, "model.pooling": cfg.model.pooling,
          "model.weights": str(cfg.model.weights), "model.freeze_backbone": cfg.model.freeze_backbone,
          "optimizer.name": cfg.optimizer.name, "optimizer.lr": cfg.optimizer.lr, "seed": cfg.seed,
          "data.name": cfg.data.name, "data.image_size": cfg.data.image_size,
          "trainer.epochs": cfg.trainer.epochs, "trainer.batch_size": cfg.trainer.batch_size}
    shown = {k: v for k, v in metrics.items() if k in ("test/acc", "test/auroc", "test/sensitivity",
                                                        "test/specificity", "val/auroc", "val/acc")
             and v is not None and not math.isnan(v)}
    for summary in hparams(hp, shown):
        writer.file_writer.add_summary(summary)


def install_signal_handlers() -> list:
    """SIGINT/SIGTERM set a flag that the step loop checks: the epoch stops, nothing is lost."""
    flag: list = [None, {}]

    def handler(signum, _frame):
        flag[0] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            flag[1][sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (some launchers): keep the default handlers
            pass
    return flag


def restore_signal_handlers(flag: list) -> None:
    for sig, previous in flag[1].items():
        signal.signal(sig, previous)


def run_safely(cfg, output_dir: Path, overrides: list[str], resume: bool) -> dict:
    """run(), with every outcome written to result.json: ok, skipped (already ok), or failed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    previous = read_result(output_dir)
    if resume and previous and previous.get("status") == "ok":
        log.info("already finished: %s (status ok), skipping", output_dir / RESULT_FILE)
        return previous
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run(cfg, output_dir, overrides, resume=resume)
    except (*USER_ERRORS, Interrupted) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        status = "interrupted" if isinstance(error, Interrupted) else "failed"
        log.error("%s: %s", status, message)
        return _write_failure(cfg, output_dir, overrides, status, message)
    except Exception as error:  # a bug: keep the traceback in the log, the one line in result.json
        log.exception("failed")
        return _write_failure(cfg, output_dir, overrides, "failed", f"{type(error).__name__}: {error}")
    finally:
        # a run that stopped early leaves its handlers installed, and Ctrl-C would then do nothing
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _write_failure(cfg, output_dir: Path, overrides, status: str, message: str) -> dict:
    try:
        result = run_summary(cfg, overrides)
    except Exception:  # the config itself is broken
        result = {"overrides": list(overrides), "metrics": {}}
    result.update(status=status, error=message)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json(output_dir / RESULT_FILE, result)
    return result


# absolute: Hydra then finds conf/ whether this module runs as __main__ or as cxr.train
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if multirun and "LOCAL_RANK" not in os.environ:  # (under torchrun, LOCAL_RANK picks the GPU)
        cfg.trainer.device = sweep_job_device(cfg.trainer.device, hydra_cfg.job.num,
                                              torch.cuda.device_count())
    # A sweep re-run into the same folder skips finished jobs and resumes interrupted ones.
    result = run_safely(cfg, output_dir, list(hydra_cfg.overrides.task), resume=cfg.trainer.resume or multirun)
    if result["status"] == "interrupted" or (result["status"] != "ok" and not multirun):
        # one line already logged; finished files stay on disk. A signal stops a sweep too: its
        # re-run skips the finished jobs and resumes this one.
        sys.exit(130 if result["status"] == "interrupted" else 1)
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

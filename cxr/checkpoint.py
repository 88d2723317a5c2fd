"""The checkpoint formats: the only module that builds or reads last.pt and best.pt.

    last.pt   everything a resumed run needs to go on exactly as if never stopped: the trained
              weights, optimizer, learning-rate schedule and scaler state, the loop's state,
              every rank's RNG states
    best.pt   the weights of the best epoch by validation, and what cxr.predict needs to use
              them: the task (its kind and classes or findings, cxr.task), image size, data.window
              (how grey values became 0..255), normalisation, the network's shape, the threshold
              (multi-label: one per finding) and the temperature its logits are divided by
              (trainer.calibration=temperature; null: none), the threshold then chosen on the
              calibrated validation probabilities

With a frozen backbone both hold only what trains (feature standardisation + head, a few hundred
KB) and a reference to the backbone: its weights setting, the seed of a random init and a digest
of its tensors, from which `load_classifier` rebuilds and verifies it. Files are written
atomically and read with `weights_only=True`: only tensors and plain containers, never code.
"""

import hashlib
import logging
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cxr.batches import MEAN, STD
from cxr.config import keys_with
from cxr.engine import TrainingState
from cxr.files import atomic_write
from cxr.model import Classifier, build_model
from cxr.pixels import DEFAULT_WINDOW
from cxr.runtime import Runtime, rng_state, set_rng_state
from cxr.task import Task

log = logging.getLogger("cxr")

# bump when the layout changes: older files are refused with a message instead of misread
# 5: the task (kind and classes) instead of the classes alone; 6: best.pt's temperature (an older
# cxr would apply a calibrated threshold to uncalibrated probabilities)
CHECKPOINT_VERSION = 6
LAST, BEST = "last.pt", "best.pt"
# what predict needs from best.pt
INFERENCE_KEYS = ("model", "task", "image_size", "mean", "std", "threshold", "temperature", "model_config")


class CheckpointError(Exception):
    """A checkpoint that cannot be used for this run (other config, other version, unreadable)."""


def save_checkpoint(state: dict, path: Path) -> None:
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save({"version": CHECKPOINT_VERSION, **state}, f))
    except OSError as error:  # disk full, quota, permissions: say so in one line
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} yet"
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}; {kept}") from None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: "
                              f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has version {found}, this cxr reads version "
                              f"{CHECKPOINT_VERSION}; start a new run or use a matching cxr")
    return state


def fingerprint(cfg) -> dict:
    """The flat config without the keys a resumed run may change (cxr.config's `resumable` keys):
    what must match to resume."""
    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    flat = dict(walk(OmegaConf.to_container(cfg, resolve=True)))
    changeable = set(keys_with("resumable"))
    return {k: v for k, v in flat.items() if k not in changeable}


def config_changes(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between two fingerprints, sorted."""
    return sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))


def trained_state(model: Classifier, frozen: bool) -> dict:
    """The weights a checkpoint holds: all of them, or all but the frozen backbone's (whose
    hundreds of tensors are not even listed: last.pt is written every epoch)."""
    return {f"{name}.{key}": value for name, part in model.named_children() if not (frozen and name == "backbone")
            for key, value in part.state_dict().items()}


class Checkpoints:
    """last.pt and best.pt of one run folder, for the model, optimizer and scaler of this run.

    Every rank calls `save_last` (it gathers their RNG states); rank 0 alone writes.
    """

    def __init__(self, output_dir: Path, model: Classifier, optimizer, scheduler, runtime: Runtime, cfg,
                 task: Task, data_index: dict):
        self.last_path, self.best_path = Path(output_dir) / LAST, Path(output_dir) / BEST
        self.model, self.optimizer, self.runtime, self.cfg = model, optimizer, runtime, cfg
        self.scheduler = scheduler
        self.task = task
        self.data_index = data_index  # cxr.data.Dataset.index(): the images and labels trained on
        self.frozen = cfg.model.freeze_backbone
        self.fingerprint = fingerprint(cfg)
        # resolved once: a run saves last.pt every epoch (resolving took half of a head epoch's time)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        # the frozen backbone, by reference: rebuilt from its settings and checked by its digest
        self.backbone = ({"name": cfg.model.backbone, "weights": cfg.model.weights, "init_seed": cfg.seed,
                          "digest": model.frozen_digest} if self.frozen else None)

    def save_last(self, state: TrainingState) -> None:
        rngs = self.runtime.gather(rng_state(self.runtime.device))
        if not self.runtime.is_main:
            return
        scaler = self.runtime.scaler
        save_checkpoint({"model": trained_state(self.model, self.frozen), "backbone": self.backbone,
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         # the fields as they are (asdict would deep-copy the growing history)
                         **{f.name: getattr(state, f.name) for f in fields(state)}, "rng": rngs,
                         "num_threads": torch.get_num_threads(),
                         "fingerprint": self.fingerprint, "data_index": self.data_index,
                         "config": self.config}, self.last_path)

    def save_best(self, epoch: int, threshold: float | list[float], weights: dict | None = None) -> None:
        if not self.runtime.is_main:
            return
        weights = trained_state(self.model, self.frozen) if weights is None else weights
        save_checkpoint({"model": weights, "backbone": self.backbone, "epoch": epoch,
                         "threshold": threshold, "temperature": None, "task": self.task.state(),
                         "image_size": self.cfg.data.image_size, "window": self.cfg.data.window,
                         "mean": list(MEAN), "std": list(STD),
                         "model_config": self.config["model"],
                         "init_seed": self.cfg.seed, "fingerprint": self.fingerprint}, self.best_path)

    def resume(self) -> TrainingState:
        """The state in last.pt, loaded into the model, optimizer, scaler and RNGs."""
        saved = load_checkpoint(self.last_path)
        changed = config_changes(saved["fingerprint"], self.fingerprint)
        if changed:
            raise CheckpointError(f"{self.last_path} was written by another config ({', '.join(changed[:5])} "
                                  "differ); resume with the same config or use a new run dir")
        self._check_data(saved.get("data_index"))
        self.model.load_state_dict(saved["model"], strict=not self.frozen)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.runtime.scaler is not None and saved["scaler"]:
            self.runtime.scaler.load_state_dict(saved["scaler"])
        rngs = saved["rng"]
        set_rng_state(rngs[self.runtime.rank % len(rngs)], self.runtime.device)
        if self.cfg.trainer.deterministic and saved["num_threads"] != torch.get_num_threads():
            # CPU kernels split their sums by thread: the same count gives the same numbers
            log.info("using %d CPU threads as before the interruption (not %d)",
                     saved["num_threads"], torch.get_num_threads())
            torch.set_num_threads(saved["num_threads"])
        state = TrainingState(**{f.name: saved[f.name] for f in fields(TrainingState)})
        if state.best_epoch == state.epoch and self._best_epoch_on_disk() != state.best_epoch:
            # killed between writing last.pt and best.pt: last.pt's weights are the best ones
            self.save_best(state.best_epoch, state.threshold, saved["model"])
        log.info("resumed from %s at epoch %d", self.last_path, state.epoch + 1)
        return state

    def _check_data(self, saved: dict | None) -> None:
        """The images and labels are those last.pt was trained on (data.root and data.csv may have
        moved: the index holds paths relative to the dataset folder)."""
        if saved is None:
            raise CheckpointError(f"{self.last_path} holds no index of the images it was trained on (an older "
                                  "cxr wrote it): it cannot be checked against this data; use a new run dir")
        differ = [f"{name} {saved[name]['images']} -> {self.data_index[name]['images']} images"
                  if saved[name]["images"] != self.data_index[name]["images"] else f"{name} other files or labels"
                  for name in saved if saved[name] != self.data_index[name]]
        if differ:
            raise CheckpointError(f"{self.last_path} was trained on other images or labels ({', '.join(differ)}); "
                                  "resume on the same dataset, or use a new run dir")

    def _best_epoch_on_disk(self) -> int | None:
        return load_checkpoint(self.best_path)["epoch"] if self.best_path.exists() else None

    def load_best(self) -> float | list[float]:
        """best.pt's weights into the model; its threshold (chosen on validation)."""
        best = load_checkpoint(self.best_path, map_location=self.runtime.device)
        self.model.load_state_dict(best["model"], strict=not self.frozen)
        return best["threshold"]

    def save_calibration(self, threshold: float | list[float], temperature: float | list[float]) -> None:
        """best.pt with the temperature fitted on its validation logits and the threshold chosen
        on the calibrated validation probabilities (cxr.calibration), in place of its own."""
        if self.runtime.is_main:
            save_checkpoint({**load_checkpoint(self.best_path), "threshold": threshold, "temperature": temperature},
                            self.best_path)

    def remove_last(self) -> None:
        if self.runtime.is_main:
            self.last_path.unlink(missing_ok=True)


def load_classifier(path: str | Path, device: torch.device) -> tuple[Classifier, Task, dict]:
    """The network of a best.pt in eval mode on `device`, its task, and the checkpoint's settings."""
    state = load_checkpoint(Path(path), map_location="cpu")
    missing = [key for key in INFERENCE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a best.pt of cxr.train")
    # a best.pt from before data.window was trained on images decoded as the dicom window decodes
    # them (8-bit images as they are; a 16-bit one was clipped then, and is scaled now)
    state.setdefault("window", DEFAULT_WINDOW)
    backbone = state.get("backbone")
    # the architecture from the checkpoint; the trained weights replace any initial ones, except
    # a frozen backbone's, which is rebuilt from its reference and must match its digest
    weights = backbone["weights"] if backbone else None
    model_cfg = OmegaConf.create({**state["model_config"], "weights": weights})
    task = Task.from_state(state["task"])
    model = build_model(model_cfg, state["image_size"], task.outputs,
                        init_seed=backbone["init_seed"] if backbone else 0)
    if backbone and model.frozen_digest != backbone["digest"]:
        raise CheckpointError(f"{path}: the backbone rebuilt from model.weights={weights} is not the "
                              "one this head was trained on (other weights file or torch version)")
    model.load_state_dict(state["model"], strict=backbone is None)
    return model.to(device).eval(), task, state


def checkpoint_file(given: str | Path) -> Path:
    """The best.pt that `given` names: the file itself, or the best.pt in a run folder."""
    path = Path(given).expanduser()
    if path.is_dir():
        if not (path / BEST).is_file():
            raise CheckpointError(f"no {BEST} in {path}: pass a run folder of python -m cxr.train or its {BEST}")
        return path / BEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a run folder of python -m cxr.train or its "
                              f"{BEST}")
    return path


def identity(path: Path, state: dict) -> dict:
    """Which model a checkpoint is (result.json of cxr.evaluate): its file and sha256, and the
    training run it came from (its data, variant and folder, a digest of its config fingerprint)."""
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    config = state.get("fingerprint") or {}
    fingerprint = hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:16]
    return {"path": str(path.resolve()), "sha256": digest, "run": path.resolve().parent.name,
            "trained_on": config.get("data.name"), "variant": config.get("variant"),
            "data_root": config.get("data.root"),
            "epoch": state.get("epoch"), "fingerprint": fingerprint, "task": state["task"],
            "image_size": state["image_size"], "window": state["window"], "threshold": state["threshold"],
            "temperature": state["temperature"]}

"""`python -m cxr.evaluate`: a trained model on another dataset (train here, test there).

    python -m cxr.evaluate checkpoint=outputs/runs/<run> data=nih data.root=/data/ChestX-ray14 labels=pneumonia
    python -m cxr.evaluate -m checkpoint=RUN_A,RUN_B data=nih,chexpert labels=pneumonia \\
        'eval.roots={nih:/data/ChestX-ray14,chexpert:/data/CheXpert-v1.0-small}'

`checkpoint` is a run folder of `python -m cxr.train` or its best.pt; `data` is any data group of
training, read through the same layouts and the same decoding cache. The checkpoint decides the
image size and data.window (a data preset's data.image_size is a training setting: the checkpoint
wins, and the log says so when they differ), the network, its temperature and its threshold.
`eval.split=test` (default) scores the target's test split, `eval.split=all` every split of it.
`eval.labels` (or a preset, `labels=pneumonia`) pairs the model's outputs with the target's labels
(cxr.transfer). `run_safely(cfg, output_dir, overrides)` writes into the run folder
(outputs/evaluations/runs/<stamp>/):

    result.json           status, the checkpoint's identity, the target data, the label pairs, and
                          `metrics`/`intervals` with the test/... keys of training (cxr.results.tested),
                          decided at the model's own threshold; beside them, for comparison only,
                          test/balanced_acc_at_target_youden and the target's own threshold
    test_predictions.csv  per image: the target task's probabilities, decision and truth

A multirun over checkpoints and datasets ends with transfer.md/.csv in the sweep folder
(cxr.aggregate). A missing or unreadable checkpoint, a target without test images or labels that
do not pair: one line, result.json with status failed, exit 1.
"""

import logging
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cxr import results, transfer
from cxr.batches import inference_batches
from cxr.checkpoint import CheckpointError, checkpoint_file, identity, load_classifier
from cxr.config import CONF_DIR, ConfigError, register_configs, validate_evaluation
from cxr.data import SPLITS, DataError, Target, load_target
from cxr.engine import predict_logits
from cxr.model import WeightsError
from cxr.runtime import DeviceError, device_name, pick_device
from cxr.transfer import LabelError, Scoring

log = logging.getLogger("cxr.evaluate")

# mistakes a user can make and fix: reported in one line, never as a traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, LabelError, DeviceError, WeightsError, torch.OutOfMemoryError)


def run(cfg, output_dir: str | Path, record: dict) -> dict:
    """Score the checkpoint on the target data, write result.json and test_predictions.csv into
    `output_dir`; `record` (results.evaluation_record's) is filled in as the steps go, and returned
    with status ok. User mistakes raise one of USER_ERRORS (`run_safely` writes the record then)."""
    started = time.perf_counter()
    validate_evaluation(cfg)
    device = pick_device(cfg.trainer.device)
    path = checkpoint_file(cfg.checkpoint)
    model, source, state = load_classifier(path, device)
    record.update(checkpoint=identity(path, state), device=device_name(device))
    target = load_target(decoded_as(cfg.data, state), SPLITS if cfg.eval.split == "all" else ("test",))
    scoring = transfer.scoring(source, target.task, record["labels"])
    for name in scoring.absent:
        log.warning("%s is not a label of the target: n/a", name)
    logits, labels, paths = target_logits(model, target, cfg.trainer.eval_batch_size, device, state)
    probs = scoring.probabilities(source.probabilities(torch.from_numpy(logits), state["temperature"]).numpy())
    labels = scoring.labels(labels)
    record["data"].update(target_summary(target, state, len(paths)))
    record.update(pairs=scoring.pairs, not_in_target=list(scoring.absent))
    record.update(scored(scoring, labels, probs, scoring.threshold(state["threshold"]), cfg.trainer.bootstrap))
    results.write_test_predictions(output_dir, paths, probs, labels, record["threshold"], scoring.task)
    record["time"] = {"total_ms": round((time.perf_counter() - started) * 1000)}
    results.write(output_dir, record)
    metrics = record["metrics"]
    log.info("%s on %s (%d images): auroc %.4f  balanced acc %.4f at the model's threshold %s (%.4f at the "
             "target's own)  ece %.4f  %s", record["checkpoint"]["trained_on"], record["data"]["name"], len(paths),
             metrics["test/auroc"], metrics["test/balanced_acc"], scoring.task.format_values(record["threshold"]),
             metrics.get("test/balanced_acc_at_target_youden", float("nan")), metrics["test/ece"], output_dir)
    return record


def with_root(cfg):
    """data.root from eval.roots by data.name where the data config leaves it unset (a multirun
    over datasets passes one root per dataset that way)."""
    roots = cfg.eval.roots
    if not OmegaConf.is_dict(roots) or not OmegaConf.is_missing(cfg.data, "root") or cfg.data.name not in roots:
        return cfg  # (eval.roots of another shape: validate_evaluation says so)
    return OmegaConf.merge(cfg, {"data": {"root": roots[cfg.data.name]}})


def decoded_as(data_cfg, state: dict):
    """The data config decoding at the checkpoint's image size and data.window: the network was
    trained on such images (a data preset's own values are training settings)."""
    for key in ("image_size", "window"):
        if data_cfg[key] != state[key]:
            log.info("decoding at the checkpoint's data.%s=%s, not the data config's %s", key, state[key],
                     data_cfg[key])
    return OmegaConf.merge(data_cfg, {"image_size": state["image_size"], "window": state["window"]})


def target_logits(model, target: Target, batch_size: int, device: torch.device,
                  state: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The network's logits, the labels and the paths of every image of the target's splits, in order."""
    parts = [predict_logits(model, inference_batches(split, batch_size, device, state["mean"], state["std"]),
                            device=device) for split in target.splits.values()]
    paths = [path for split in target.splits.values() for path in split.paths]
    return np.concatenate([logits for logits, _ in parts]), np.concatenate([labels for _, labels in parts]), paths


def target_summary(target: Target, state: dict, images: int) -> dict:
    task = target.task
    return {"task": task.kind, "classes": list(task.classes), "multilabel": task.multilabel, "root": str(target.root),
            "images": images, "image_size": state["image_size"], "window": state["window"],
            "skipped_files": len(target.skipped), "skipped": target.skipped, "patients": target.patients}


def scored(scoring: Scoring, labels: np.ndarray, probs: np.ndarray, threshold, resamples: int) -> dict:
    """results.tested at the model's threshold, and beside it (comparison only) the target's own
    Youden threshold and the metrics at it (not for a multi-class target: argmax has none)."""
    task = scoring.task
    tested = results.tested(task, labels, probs, threshold, task.mean_loss(probs, labels), resamples)
    for warning in tested["warnings"]:
        log.warning("%s on the target", warning)
    if task.kind == "multiclass":
        return {**tested, "status": results.OK, "target_threshold": None}
    own = task.choose_threshold("youden", labels, probs)
    metrics = {**tested["metrics"], **results.at_target_threshold(task.metrics(labels, probs, own))}
    return {**tested, "status": results.OK, "metrics": metrics, "target_threshold": own}


def run_safely(cfg, output_dir: Path, overrides: list[str]) -> dict:
    """run(), with every outcome in result.json: ok, or failed with one line (the log has a bug's
    traceback) and what was known by then (the checkpoint's identity once it was read)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = with_root(cfg)
    record = results.evaluation_record(cfg, overrides, {"path": OmegaConf.select(cfg, "checkpoint")})
    try:
        return run(cfg, output_dir, record)
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error("failed: %s", message)
    except Exception as error:  # a bug: keep the traceback in the log, the one line in result.json
        log.exception("failed")
        message = f"{type(error).__name__}: {error}"
    record.update(status=results.FAILED, error=message)
    results.write(output_dir, record)
    return record


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    result = run_safely(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    if result["status"] != results.OK and hydra_cfg.mode != RunMode.MULTIRUN:
        sys.exit(1)  # one line already logged; a multirun goes on, and its report exits 1


if __name__ == "__main__":
    # the importable module's `main`, not this __main__ copy: launchers that send the task to other
    # processes (joblib, submitit) pickle a function of __main__ by value, by name they can
    from cxr.evaluate import main as importable_main

    importable_main()

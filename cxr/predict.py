"""`python -m cxr.predict checkpoint=PATH inputs=PATH`: classify chest X-rays with a trained model.

    python -m cxr.predict checkpoint=outputs/runs/<run>/best.pt inputs=xrays/ \\
        [output=predictions.csv] [gradcam=DIR] [gradcam_class=NAME] [batch_size=32] [device=auto]

`inputs` is one image or a folder searched recursively for JPEG, PNG (8 or 16 bits), TIFF and
DICOM files (`.dcm`, or any file with the DICM preamble; hidden files and macOS' __MACOSX/ left
out), of any size, grayscale or RGB. Everything else comes from the checkpoint, never from the
current config: image size, data.window (how a DICOM or 16-bit image's grey values become 0..255),
normalisation, class names, the network's shape, the temperature calibration fitted
(trainer.calibration=temperature) and the decision threshold chosen on validation.

`output` gets one row per file: path, the probability of each class, the label, and a status
(`ok`, or `unreadable`: such files are listed with their reasons and warned about, never fatal,
unless no file is readable). A multi-label
model gives a probability per finding, and the label lists the findings above their thresholds
(joined by |; "No Finding" when none is). `gradcam=DIR` also writes a Grad-CAM overlay per image,
at the image's own size on its windowed picture, as DIR/<path below inputs>.png: of the positive class, or of
`gradcam_class=<class or finding>` (default for multi-label: the first finding).

Arguments are key=value pairs, as for `python -m cxr.train`; a misspelt key is refused.
"""

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cxr import results
from cxr.batches import inference_batches
from cxr.checkpoint import CheckpointError, load_classifier
from cxr.data import is_visible
from cxr.decoding import decode_split
from cxr.explain import GradCamUnavailable, check_grad_cam, grad_cam, save_overlay
from cxr.model import Classifier, WeightsError
from cxr.pixels import DecoderMissing, is_dicom
from cxr.runtime import DeviceError, pick_device
from cxr.task import Task

log = logging.getLogger("cxr.predict")

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".dcm")
# files decoded (in parallel) at a time: memory stays flat for folders of any size
DECODE_CHUNK = 1024


@dataclass
class PredictConfig:
    checkpoint: str = MISSING
    inputs: str = MISSING
    output: str = "predictions.csv"
    gradcam: str | None = None
    # the class (multi-label: the finding) Grad-CAM explains; null: the positive class, or the first finding
    gradcam_class: str | None = None
    batch_size: int = 32
    device: str = "auto"


class PredictError(Exception):
    """A user mistake (bad or missing argument, no images found): reported as one line."""


def find_images(inputs: str | Path) -> list[Path]:
    """`inputs` itself if it is a file, else every image below it (by suffix, or a DICOM file by
    its preamble), sorted."""
    inputs = Path(inputs)
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise PredictError(f"inputs does not exist: {inputs}")
    return sorted(
        path for path in inputs.rglob("*")
        if path.is_file() and all(is_visible(Path(part)) for part in path.relative_to(inputs).parts)
        and (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(str(path)))
    )


def classify(model: Classifier, task: Task, settings: dict, files: list[Path], device: torch.device,
             batch_size: int = 32, overlays: dict[str, Path] | None = None,
             gradcam_class: str | None = None, skipped: dict[str, str] | None = None) -> list[dict]:
    """One row per file, in the order of `files`: path, prob_<class>..., label, status.

    With `overlays` (file -> PNG to write), the Grad-CAM forward pass gives the probabilities
    too, and each readable image's overlay (of `gradcam_class`) is written where `overlays` says.
    Unreadable files are added to `skipped` with their reasons. Raises DecoderMissing.
    """
    threshold = settings["threshold"]
    target = cam_target(task, gradcam_class)
    rows = {}
    for start in range(0, len(files), DECODE_CHUNK):
        # decode_split, as in training, with -1 for the labels that predict does not have
        items = [(str(path), -1) for path in files[start:start + DECODE_CHUNK]]
        split = decode_split(items, settings["image_size"], workers=0, desc="predict", window=settings["window"])
        for path in split.skipped:
            rows[path] = {"path": path, "status": "unreadable"}
        if skipped is not None:
            skipped.update(split.skipped)
        paths = iter(split.paths)
        for x, _ in inference_batches(split, batch_size, device, settings["mean"], settings["std"]):
            if overlays is None:
                with torch.no_grad():
                    logits = model(x)
                cams = [None] * len(x)
            else:
                cams, logits = grad_cam(model, task, x, target)
            probs = task.probabilities(logits, settings["temperature"]).cpu().numpy()
            labels = task.decide(probs, threshold)
            for p, label, cam in zip(probs, labels, cams, strict=True):
                path = next(paths)
                rows[path] = task.prediction_row(path, p, label)
                if cam is not None:
                    overlays[path].parent.mkdir(parents=True, exist_ok=True)
                    save_overlay(path, cam, overlays[path], settings["window"])
    return [rows[str(path)] for path in files]


def cam_target(task: Task, name: str | None) -> int:
    """The output Grad-CAM explains: `name` (gradcam_class), else the positive class or first finding."""
    try:
        return task.cam_target(name)
    except ValueError:
        raise PredictError(f"gradcam_class={name} is not one of the checkpoint's classes: "
                           f"{', '.join(task.classes)}") from None


def parse_args(argv: list[str]) -> PredictConfig:
    """key=value pairs over PredictConfig: unknown keys, wrong types and missing values fail."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PredictConfig), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as error:
        raise PredictError(str(error).splitlines()[0]) from None
    if missing:
        raise PredictError(f"missing {', '.join(f'{key}=...' for key in missing)}")
    if cfg.batch_size < 1:
        raise PredictError(f"batch_size must be >= 1, got {cfg.batch_size}")
    return OmegaConf.to_object(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    started = time.perf_counter()
    try:
        cfg = parse_args(argv)
        files = find_images(cfg.inputs)
        if not files:
            raise PredictError(f"no image files (JPEG, PNG, TIFF, DICOM) under {cfg.inputs}")
        device = pick_device(cfg.device)
        model, task, settings = load_classifier(cfg.checkpoint, device)
        if cfg.gradcam is not None:
            check_grad_cam(model)
            cam_target(task, cfg.gradcam_class)
    except (PredictError, CheckpointError, DeviceError, WeightsError, GradCamUnavailable) as error:
        log.error("%s", error)
        return 1
    overlays = None
    if cfg.gradcam is not None:  # DIR/<path below inputs>.png: subfolders kept, no name clashes
        root = Path(cfg.inputs) if Path(cfg.inputs).is_dir() else Path(cfg.inputs).parent
        overlays = {str(p): Path(cfg.gradcam) / p.relative_to(root).with_suffix(".png")
                    for p in files}
    skipped: dict[str, str] = {}
    try:
        rows = classify(model, task, settings, files, device, cfg.batch_size, overlays, cfg.gradcam_class, skipped)
    except DecoderMissing as error:
        log.error("%s", error)
        return 1
    results.write_predictions(rows, task.prediction_columns(with_truth=False), cfg.output)
    if skipped:
        log.warning("%d unreadable file(s), listed with status unreadable: %s", len(skipped),
                    ", ".join(f"{path} ({reason})" for path, reason in skipped.items()))
    if len(skipped) == len(rows):
        path, reason = next(iter(skipped.items()))
        log.error("none of the %d file(s) in %s is a readable image (%s: %s)", len(rows), cfg.inputs, path, reason)
        return 1
    log.info("%d file(s) -> %s (%d unreadable) in %.1f s%s", len(rows), cfg.output,
             len(skipped), time.perf_counter() - started,
             f", Grad-CAM overlays in {cfg.gradcam}" if overlays else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

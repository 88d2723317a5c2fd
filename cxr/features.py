"""What the trainable module reads: images, or frozen-backbone features computed once.

`training_view()` decides it once per run. Normally the whole classifier trains on normalised
(and, if asked, augmented) images. With `model.freeze_backbone=true` nothing below the head
learns, so the backbone maps an image to the same vector in every epoch of every job of a sweep.
It runs once over each split, in eval mode (BatchNorm on its running statistics, as a frozen
Keras base runs), and the features are cached as float16 in `<data.cache_dir>/features/<key>.npy`
(cxr.arrays: written a batch at a time, an index beside it with a crc32 of every row, checked
before each use); the head then trains on batches of them, read from the file's memory map.

The key covers everything the features depend on: the decoded split (`decoding.cache_key`: the file
list with sizes and mtimes, the image size, the decoding and data.window), the normalisation, a
digest of the backbone's weights and buffers (ImageNet, a state-dict file and a seeded random init are told apart
by what they hold, not by name), the pooling and the autocast dtype. The classifier's FeatureNorm
takes the training features' mean and std, so the head reads standardised features.

Where the splits then live (on the CPU: the maps; on a GPU: the job's memory plan) is
cxr.placement's to decide.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr import arrays
from cxr.batches import MEAN, STD, Augment, eval_batches, preprocess, train_batches
from cxr.decoding import Split, cache_key
from cxr.engine import autocast
from cxr.files import exclusive
from cxr.model import Classifier
from cxr.placement import place

log = logging.getLogger(__name__)

# bump when extraction or the file layout changes: old feature files are then never read again
FEATURE_VERSION = 2  # 2: written a batch at a time, with an index holding a crc32 of every row
# Images x pixels of an extraction batch on a CPU (trainer.eval_batch_size caps it everywhere): a
# ResNet50 holds ~230 bytes of activations a pixel (1.4 GB for 128 images at 224 px, measured),
# and a CPU is faster on small batches, whose activations stay in its caches (2 cores, random-init
# ResNet50: 25 img/s at 8 images of 224 px against 18 at 32, peak RSS 1.02 against 1.33 GB; 64 px:
# 230-254 img/s at 98 images against 193-198 at 392), with the same features to the bit.
CPU_BATCH_PIXELS = 8 * 224 * 224


@dataclass
class TrainingView:
    """What trains, what it reads, and how a batch of what it reads becomes its input."""

    module: nn.Module  # the whole classifier, or (frozen backbone) its feature_norm + head
    train: Split
    val: Split
    test: Split
    prepare: Callable[[torch.Tensor, Augment | None], torch.Tensor]  # (batch, augment) -> module input
    cpu_threads: int | None = None  # intra-op threads for training it on a CPU (None: torch's)

    def train_inputs(self, batch_size: int, epoch: int, seed: int, augment: Augment | None, rank: int = 0,
                     world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, labels in train_batches(self.train, batch_size, epoch, seed, rank, world):
            yield self.prepare(x, augment), labels

    def eval_inputs(self, split: Split, batch_size: int, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, labels in eval_batches(split, batch_size, rank, world):
            yield self.prepare(x, None), labels


def training_view(model: Classifier, splits: Sequence[Split], cfg, device: torch.device,
                  amp_dtype: torch.dtype | None) -> TrainingView:
    """The image view, or the frozen-backbone view when `model.freeze_backbone` is set, of the
    decoded `splits` (train, val, test), each placed for `device` by the job's memory plan."""
    if not cfg.model.freeze_backbone:
        channels_last = cfg.trainer.channels_last
        return TrainingView(model, *place(splits, device, cfg),
                            prepare=lambda x, augment: preprocess(x, channels_last, augment))
    return feature_view(model, cached_features(model.backbone, model.frozen_digest, splits, cfg, device, amp_dtype),
                        cfg, device)


def feature_view(model: Classifier, features: Sequence[Split], cfg, device: torch.device) -> TrainingView:
    """The head's view of float16 feature splits (train, val, test; `cached_features`' maps): the
    classifier's FeatureNorm fitted to the training features, read a chunk at a time, and each
    split placed for `device`."""
    train = features[0]
    chunk = arrays.chunk_rows(train.images.shape, train.images.element_size())
    model.feature_norm.fit(x for x, _ in eval_batches(train, chunk))
    # Each batch reaches the head as it is held: FeatureNorm's subtraction of its float32 mean
    # promotes float16 rows to float32 in the same pass (a separate cast was 7% of a head epoch's
    # time in a profile; the same numbers, as float16 converts to float32 exactly). A head's ops
    # on a batch of 32 vectors are too small to gain from threads, and on a busy machine OpenMP
    # threads waiting for each other made each step ~100x slower (measured on 2 cores beside other
    # jobs: 5-35 batches/s on 2 threads, 1,300-1,900 on one).
    return TrainingView(model.top(), *place(features, device, cfg), prepare=lambda x, augment: x,
                        cpu_threads=1)


def feature_key(split: Split, image_size: int, window: str, weights: str, pooling: str,
                amp_dtype: torch.dtype | None) -> str:
    items = list(zip(split.paths, split.labels.tolist(), strict=True))
    payload = [FEATURE_VERSION, cache_key(items, image_size, window), MEAN, STD, weights, pooling,
               str(amp_dtype)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


@torch.no_grad()
def feature_batches(backbone: nn.Module, split: Split, batch_size: int, device: torch.device,
                    amp_dtype: torch.dtype | None, channels_last: bool) -> Iterator[torch.Tensor]:
    """float16 features (B, F) of the split's images, a batch at a time, on `device`.

    A split held on the host sends each batch to `device` as it is sliced (cxr.batches), so the
    decoded images never need the device's memory whole.
    """
    backbone.eval()
    for images, _ in eval_batches(split.to(device, host=True), batch_size):
        with autocast(device, amp_dtype):
            features = backbone(preprocess(images, channels_last))
        yield features.half()


def extract(backbone: nn.Module, split: Split, batch_size: int, device: torch.device,
            amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """float16 features (N, F) of every image of the split, on `device`: one backbone pass, kept on
    the device (no host sync per batch), as cxr.bench times it."""
    return torch.cat(list(feature_batches(backbone, split, batch_size, device, amp_dtype, channels_last)))


def extraction_batch_size(eval_batch_size: int, image_size: int, device: torch.device) -> int:
    """Images per backbone batch when extracting features: trainer.eval_batch_size, on a CPU
    capped at CPU_BATCH_PIXELS."""
    if device.type != "cpu":
        return eval_batch_size
    return max(1, min(eval_batch_size, CPU_BATCH_PIXELS // image_size ** 2))


def cached_features(backbone: nn.Module, digest: str, splits: Sequence[Split], cfg, device: torch.device,
                    amp_dtype: torch.dtype | None) -> list[Split]:
    """Each image split as a split of its backbone features: float16 (N, F), mapped from the cache
    file, computed (on `device`) and cached first where the file is missing or damaged."""
    if cfg.data.augment != "none":
        log.warning("data.augment does not apply with model.freeze_backbone=true: the head trains "
                    "on cached features of the unaugmented images")
    backbone.eval()  # for the whole run: BatchNorm as the features were made, in Grad-CAM too
    folder = Path(cfg.data.cache_dir).expanduser() / "features"
    folder.mkdir(parents=True, exist_ok=True)
    batch_size = extraction_batch_size(cfg.trainer.eval_batch_size, cfg.data.image_size, device)
    out = []
    for split in splits:
        key = feature_key(split, cfg.data.image_size, cfg.data.window, digest, cfg.model.pooling, amp_dtype)
        features = load_features(folder / f"{key}.npy", len(split), lambda split=split: feature_batches(
            backbone, split, batch_size, device, amp_dtype, cfg.trainer.channels_last))
        out.append(Split(torch.from_numpy(features), split.labels, split.paths, split.skipped,
                         mapping=arrays.mapping_of(features)))
    return out


def load_features(array_file: Path, rows: int, batches: Callable[[], Iterator[torch.Tensor]]) -> np.memmap:
    """The features cached in `array_file`, mapped; computed from `batches()` and cached first when
    the file is missing, damaged or not of `rows` rows (with a warning when it was there).

    Sweep jobs (and torchrun ranks) started together on an empty cache: the first computes the
    features, the others wait on the lock and then read its file.
    """
    index_file = array_file.with_suffix(".json")
    with exclusive(array_file.with_name(f".{array_file.stem}.lock")):
        arrays.remove_stale_tmp(array_file.parent)
        if array_file.exists() or index_file.exists():
            features = _read(array_file, index_file, rows)
            if features is not None:
                log.info("features of %d images read from %s", rows, array_file)
                return features
            log.warning("feature cache %s is damaged or does not match its split; recomputing it", array_file)
        started = time.perf_counter()
        features, _ = arrays.build(array_file, index_file, lambda tmp: _write(tmp, rows, batches()), None)
        log.info("features of %d images computed in %.1f s, cached in %s", rows,
                 time.perf_counter() - started, array_file)
        return features


def _write(tmp: Path, rows: int, batches: Iterator[torch.Tensor]) -> dict:
    """The feature batches into a new .npy at `tmp`, each as it comes (host memory stays flat
    whatever the split's size); what the index says of the file."""
    shape, offset, written = None, 0, 0
    for batch in batches:
        batch = batch.cpu().numpy()
        if shape is None:
            shape = (rows, *batch.shape[1:])
            offset = arrays.create(tmp, batch.dtype, shape)
        arrays.write_rows(tmp, offset, written, batch)
        written += len(batch)
    if shape is None or written != rows:
        raise RuntimeError(f"the backbone gave features of {written} images for {rows}")
    return {"version": FEATURE_VERSION, "shape": list(shape)}


def _read(array_file: Path, index_file: Path, rows: int) -> np.memmap | None:
    """The cached features, mapped, or None unless the file is exactly what its index says (shape,
    size, the crc32 of every row: the head reads every row each epoch anyway) and has `rows` rows."""
    try:
        index = json.loads(index_file.read_text())
        shape = tuple(index["shape"])
        if index["version"] != FEATURE_VERSION or shape[0] != rows:
            return None
        return arrays.open_checked(array_file, np.float16, shape, index["sample_crc32"], None)
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # unreadable, not our layout
        return None

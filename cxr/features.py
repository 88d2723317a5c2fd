"""What the trainable module reads: images, or frozen-backbone features computed once.

`training_view()` decides it once per run. Normally the whole classifier trains on normalised
(and, if asked, augmented) images. With `model.freeze_backbone=true` nothing below the head
learns, so the backbone maps an image to the same vector in every epoch of every job of a sweep.
It runs once over each split, in eval mode (BatchNorm on its running statistics, as a frozen
Keras base runs), and the features are cached as float16 in `<data.cache_dir>/features/<key>.npy`;
the head then trains on batches of them.

The key covers everything the features depend on: the decoded split (`decoding.cache_key`: the file
list with sizes and mtimes, the image size, the decoding and data.window), the normalisation, a digest of the
backbone's weights and buffers (ImageNet, a state-dict file and a seeded random init are told apart
by what they hold, not by name), the pooling and the autocast dtype. The classifier's FeatureNorm
takes the training features' mean and std, so the head reads standardised features.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr.batches import MEAN, STD, Augment, eval_batches, preprocess, train_batches
from cxr.decoding import Split, cache_key
from cxr.engine import autocast
from cxr.files import atomic_write
from cxr.model import Classifier, weights_digest

log = logging.getLogger(__name__)

# bump when extraction changes: old feature files are then never read again
FEATURE_VERSION = 1


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
    """The image view, or the frozen-backbone view when `model.freeze_backbone` is set."""
    if not cfg.model.freeze_backbone:
        channels_last = cfg.trainer.channels_last
        return TrainingView(model, *splits,
                            prepare=lambda x, augment: preprocess(x, channels_last, augment))
    features = cached_features(model.backbone, splits, cfg, device, amp_dtype)
    model.feature_norm.fit(features[0].images)
    # A head's ops on a batch of 32 vectors are too small to gain from threads, and on a busy
    # machine OpenMP threads waiting for each other made each step ~100x slower (measured on
    # 2 cores beside other jobs: 5-35 batches/s on 2 threads, 1,300-1,900 on one).
    return TrainingView(model.top(), *features, prepare=lambda x, augment: x, cpu_threads=1)


def feature_key(split: Split, image_size: int, window: str, weights: str, pooling: str,
                amp_dtype: torch.dtype | None) -> str:
    items = list(zip(split.paths, split.labels.tolist(), strict=True))
    payload = [FEATURE_VERSION, cache_key(items, image_size, window), MEAN, STD, weights, pooling,
               str(amp_dtype)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


@torch.no_grad()
def extract(backbone: nn.Module, split: Split, batch_size: int, device: torch.device,
            amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """float16 features (N, F) of every image of the split, on `device`."""
    backbone.eval()
    chunks = []
    for images, _ in eval_batches(split, batch_size):
        with autocast(device, amp_dtype):
            features = backbone(preprocess(images.to(device, non_blocking=True), channels_last))
        chunks.append(features.half())  # kept on the device: no host sync per batch
    return torch.cat(chunks)


def _read(path: Path, count: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        features = np.load(path)
    except (OSError, ValueError, EOFError):
        features = None
    if features is None or features.ndim != 2 or len(features) != count:
        log.warning("feature cache %s is unreadable or does not match its split; recomputing", path)
        return None
    return features


def cached_features(backbone: nn.Module, splits: Sequence[Split], cfg, device: torch.device,
                    amp_dtype: torch.dtype | None) -> list[Split]:
    """Each image split as a split of backbone features on `device`, cached on disk.

    Under torchrun every rank that misses the cache computes the same file and writes it
    atomically, so no rank waits for another and a reader never sees half a file.
    """
    if cfg.data.augment != "none":
        log.warning("data.augment does not apply with model.freeze_backbone=true: the head trains "
                    "on cached features of the unaugmented images")
    backbone.eval()  # for the whole run: BatchNorm as the features were made, in Grad-CAM too
    folder = Path(cfg.data.cache_dir).expanduser() / "features"
    folder.mkdir(parents=True, exist_ok=True)
    weights = weights_digest(backbone)
    out = []
    for split in splits:
        key = feature_key(split, cfg.data.image_size, cfg.data.window, weights, cfg.model.pooling, amp_dtype)
        path = folder / f"{key}.npy"
        cached = _read(path, len(split))
        if cached is not None:
            features = torch.from_numpy(cached).to(device)
            log.info("features of %d images read from %s", len(split), path)
        else:
            started = time.perf_counter()
            features = extract(backbone, split, cfg.trainer.eval_batch_size, device, amp_dtype,
                               cfg.trainer.channels_last)
            atomic_write(path, partial(np.save, arr=features.cpu().numpy()))
            log.info("features of %d images computed in %.1f s, cached in %s", len(split),
                     time.perf_counter() - started, path)
        # float32 in memory: a head step reads its batch twice (forward, weight gradient), and
        # casting float16 batches first would add a third pass (~30% of the step on a CPU)
        out.append(Split(features.float(), split.labels, split.paths, split.skipped))
    return out

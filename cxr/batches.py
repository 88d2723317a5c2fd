"""Batches on the training device: slicing the splits, normalising, augmenting.

A split the job's memory plan puts on the training device (cxr.placement) lives there whole, so a
batch is an index into it: no host copy and no DataLoader worker in the step. One held on the host
(a CPU run's file maps; on a GPU, one larger than the job's share) is sliced there and each batch is
copied to the device through pinned memory, asynchronously. Conversion to float, normalisation and
augmentation run on the device, on whole batches.
"""

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from cxr import arrays
from cxr.decoding import Split

# ImageNet statistics, as torchvision's weights expect (RGB mean/std, not Keras' caffe-style BGR
# mean subtraction); the grayscale image is fed to all three channels.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def train_batches(split: Split, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of this rank's share of the split for `epoch`.

    DistributedSampler gives each rank a disjoint, equally long share (one rank: all of it) in an
    order fixed by (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """
    sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    yield from _batches(split, torch.tensor(list(sampler), device=split.images.device), batch_size)


def eval_batches(split: Split, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of the split, in order, each image once (no padding)."""
    yield from _batches(split, torch.arange(rank, len(split), world_size, device=split.images.device), batch_size)


# bytes of a split read before what reading it left resident is handed back (arrays.release): a
# process holds about twice this of a map, whatever the split's size, and a smaller split stays
# resident from one epoch to the next
RELEASE_BYTES = 64 << 20


def _batches(split: Split, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of the split's rows in `order`, `batch_size` at a time, on split.device."""
    read = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        # index_select: the same rows as split.images[idx], gathered ~1.7x faster on a CPU (a head
        # step on cached features is mostly this gather)
        x, y = split.images.index_select(0, idx), split.labels.index_select(0, idx)
        read += x.nbytes
        if read >= RELEASE_BYTES:
            arrays.release(split.mapping)
            read = 0
        if x.device.type != split.device.type:  # held on the host for an accelerator
            x, y = _copied(x, split.device), _copied(y, split.device)
        yield x, y


def inference_batches(split: Split, batch_size: int, device: torch.device, mean: Sequence[float],
                      std: Sequence[float]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A decoded split as a checkpoint's whole network reads it (cxr.predict, cxr.evaluate): in
    order, on `device`, normalised with the checkpoint's statistics, never augmented; with labels."""
    for images, labels in eval_batches(split, batch_size):
        yield preprocess(images.to(device), False, mean=mean, std=std), labels


def _copied(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`; to a CUDA GPU through pinned memory, asynchronously, so that the
    copy overlaps the GPU's work on the batch before."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def preprocess(images: torch.Tensor, channels_last: bool, augment: "Augment | None" = None,
               mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> normalised float (B, 3, S, S), on whatever device the batch is.

    augment: the random transform of training batches (None for evaluation).
    mean/std: per-channel RGB statistics; predict passes the ones stored in the checkpoint.
    (x / 255 - mean) / std is computed as x * 1 / (255 std) - mean / std, one fused multiply-add
    that broadcasts the gray channel into all three, written straight in the asked memory format:
    one pass over the batch instead of five (2.5x faster on a CPU).
    """
    x = images.float()
    if augment is not None:
        x = augment(x)
    scale, shift = normalisation(x.device, tuple(mean), tuple(std))
    b, _, h, w = x.shape
    out = torch.empty((b, 3, h, w), device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.addcmul(shift, x, scale, out=out)


@functools.cache
def normalisation(device: torch.device, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess`'s scale 1 / (255 std) and shift -mean / std, (1, 3, 1, 1) on `device`.

    Built once per device and statistics: a tensor made from a Python list on a GPU is a blocking
    host-to-device copy, which would make the host wait for the GPU in every step.
    """
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t
    return (255 * std_t).reciprocal(), shift


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `preprocess` (without augmentation): float images in [0, 1] for display."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@dataclass(frozen=True)
class Strength:
    """Ranges of one augmentation preset: each image draws uniformly within +-range."""

    rotate_degrees: float
    shift: float  # of the image side
    scale: float
    brightness: float  # added, of the full intensity range
    contrast: float  # relative change of the spread around the image's mean
    gamma: float  # log2 of the gamma exponent: 0.15 is 0.90..1.11


# light: the small shift and zoom cxr always had, a little rotation and exposure change;
# strong: what radiographs from other machines and positionings differ by
# (none: batches as decoded; config validation reads the names from here too)
AUGMENT = {"none": None,
           "light": Strength(rotate_degrees=5, shift=0.06, scale=0.08, brightness=0.05, contrast=0.1, gamma=0.15),
           "strong": Strength(rotate_degrees=10, shift=0.1, scale=0.15, brightness=0.1, contrast=0.25, gamma=0.35)}


class Augment:
    """A preset's random affine (rotation, shift, zoom, optional mirror) and intensity change,
    for whole batches on their device, drawn from its own generator: the same seed and epoch
    give the same images whatever else consumed random numbers (a resumed run included)."""

    def __init__(self, preset: str, hflip: bool, seed: int, device: torch.device):
        self.strength, self.hflip = AUGMENT[preset], hflip
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Uniform in [-1, 1)."""
        return torch.rand(*shape, device=device, generator=self.generator) * 2 - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (B, 1, S, S) in [0, 255], transformed; the same shape and range."""
        return self.intensity(self.affine(x))

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[0], self.strength
        angle = self.uniform(n, device=x.device) * math.radians(s.rotate_degrees)
        zoom = 1 + self.uniform(n, device=x.device) * s.scale
        mirror = torch.ones(n, device=x.device)
        if self.hflip:
            mirror = torch.where(torch.rand(n, device=x.device, generator=self.generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = zoom * torch.cos(angle) * mirror, -zoom * torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = zoom * torch.sin(angle) * mirror, zoom * torch.cos(angle)
        theta[:, :, 2] = self.uniform(n, 2, device=x.device) * s.shift * 2  # grid units: side = 2
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Gamma, then contrast around each image's mean, then brightness, on [0, 1]."""
        n, s = x.shape[0], self.strength
        unit = (x / 255).clamp(0, 1)
        gamma = torch.exp2(self.uniform(n, 1, 1, 1, device=x.device) * s.gamma)
        unit = unit ** gamma
        mean = unit.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + self.uniform(n, 1, 1, 1, device=x.device) * s.contrast
        brightness = self.uniform(n, 1, 1, 1, device=x.device) * s.brightness
        return ((unit - mean) * contrast + mean + brightness).clamp(0, 1) * 255


def epoch_augment(preset: str, hflip: bool, seed: int, epoch: int, device: torch.device) -> Augment | None:
    """The augmentation of one epoch's training batches (None for preset `none`), seeded by the
    run's seed and the epoch alone."""
    if AUGMENT[preset] is None:
        return None
    return Augment(preset, hflip, seed * 100_003 + epoch, device)

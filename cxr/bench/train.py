"""`python -m cxr.bench train`: what the real trainer costs over a bare training loop.

Both sides train the same module (the whole network, or with --trainable head the head on frozen
features, whatever the data group's default) with the same optimizer and precision, on the same
images in batches of the same size: the bare side a forward/backward/step loop over inputs
prepared once, in fixed order; the trainer side one epoch of `cxr.training.Training.train_epoch`,
built by `build_training` exactly as `python -m cxr.train` builds a run (shuffled batches sliced on
the device and normalised there, the loss accounting, the scheduler). The JSON states what each
side ran, how many parameters each changed and how many images each fed its module.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxr.bench.images import image_source, repeat_images
from cxr.bench.options import add_common, add_images, add_scale, scale_of, work_folder
from cxr.bench.runs import TrainerEpoch, compose_train, trainable, trainer_epoch
from cxr.bench.timing import machine, publish, show, side_by_side
from cxr.data import find_classes
from cxr.decoding import load_split
from cxr.engine import autocast
from cxr.runtime import cpu_threads, pick_device

HELP = "a bare forward/backward/step loop vs the real trainer: same network, batches and precision (img/s)"
TRAINABLE = {"whole": "false", "head": "true"}  # --trainable -> model.freeze_backbone


@dataclass(frozen=True)
class Scale:
    size: int
    batch_size: int
    steps: int
    repeats: int
    distinct: int


FULL = Scale(size=64, batch_size=32, steps=3, repeats=9, distinct=40)
QUICK = Scale(size=32, batch_size=8, steps=2, repeats=1, distinct=4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scale(parser, FULL, QUICK, {
        "size": "resolution (px)", "batch_size": "images per batch", "steps": "batches per timing",
        "repeats": "timings of each loop (median)", "distinct": "originals to generate when no folder is given"})
    parser.add_argument("--trainable", choices=tuple(TRAINABLE), default="whole",
                        help="what both sides train: the whole network, or its head on frozen features (default whole)")
    add_images(parser)
    add_common(parser, "train", "seconds: two small batches, one timing each")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides of conf/train.yaml for both sides (e.g. model=resnet18)")


def bare_loop(epoch: TrainerEpoch) -> Callable[[], int]:
    """A forward/backward/step loop over the trainer's own module, optimizer and precision, on its
    training split prepared once (normalised images, or features), batch after batch in order."""
    module, optimizer, runtime = epoch.module, epoch.training.optimizer, epoch.runtime
    split, batch = epoch.training.view.train, epoch.cfg.trainer.batch_size
    inputs, labels = epoch.fed.prepare(split.images, None), split.labels

    def bare() -> int:
        module.train()
        for start in range(0, len(labels), batch):
            with autocast(runtime.device, runtime.amp_dtype):
                loss = F.cross_entropy(module(inputs[start:start + batch]).float(), labels[start:start + batch])
            optimizer.zero_grad(set_to_none=True)
            if runtime.scaler is None:
                loss.backward()
                optimizer.step()
            else:
                runtime.scaler.scale(loss).backward()
                runtime.scaler.step(optimizer)
                runtime.scaler.update()
        return len(labels)

    return bare


def changed_parameters(module: torch.nn.Module, fn: Callable[[], int]) -> int:
    """fn() once (a warm-up); how many of `module`'s parameters it changed (whole tensors)."""
    before = [p.detach().clone() for p in module.parameters()]
    fn()
    return sum(p.numel() for p, old in zip(module.parameters(), before, strict=True) if not torch.equal(p, old))


def measure(epoch: TrainerEpoch, repeats: int) -> dict:
    """Both sides, each warmed up once (counting what it changed), then alternating."""
    sides = {"bare": bare_loop(epoch), "trainer": epoch}
    with cpu_threads(epoch.training.view.cpu_threads, epoch.runtime.device):
        changed = {name: changed_parameters(epoch.module, fn) for name, fn in sides.items()}
        timings = side_by_side(sides, repeats, epoch.runtime.device)
    cfg, runtime = epoch.cfg, epoch.runtime
    ran = {"bare": "a forward/backward/step loop over inputs prepared once, in order",
           "trainer": "Training.train_epoch (cxr.training), as python -m cxr.train runs an epoch"}
    return {name: {"runs": ran[name], "trainable": trainable(cfg), "model": cfg.model.backbone,
                   "parameters": changed[name], "images": timings[name]["images"], "image_size": cfg.data.image_size,
                   "batch_size": cfg.trainer.batch_size, "amp": str(runtime.amp_dtype),
                   "channels_last": cfg.trainer.channels_last, "img_s": timings[name]["img_s"]}
            for name in sides}


def run(args: argparse.Namespace) -> dict:
    scale = scale_of(args, FULL, QUICK)
    pick_device(args.device)  # a device this machine lacks: one line before any work
    with work_folder(args.work, "train") as work:
        cfg = compose_train([f"data.image_size={scale.size}", f"data.cache_dir={work.path / 'cache'}",
                             "model.weights=null", f"model.freeze_backbone={TRAINABLE[args.trainable]}",
                             f"trainer.batch_size={scale.batch_size}", f"trainer.device={args.device}",
                             "trainer.progress=false", *args.overrides])
        source = image_source(args.images, scale.distinct, work.path)
        items = repeat_images(source, work.path / "images", scale.steps * scale.batch_size)
        split = load_split(items, scale.size, work.path / "cache" / "decoded", 0, "bench")
        epoch = trainer_epoch(cfg, split, find_classes(work.path / "images"))
        sides = measure(epoch, scale.repeats)
    report = {**machine(epoch.runtime.device), "quick": args.quick, "size": scale.size,
              "batch_size": scale.batch_size, "images": len(split), "trainable": trainable(cfg), **sides,
              "bare_img_s": sides["bare"]["img_s"], "trainer_img_s": sides["trainer"]["img_s"],
              "trainer_vs_bare": sides["trainer"]["img_s"] / sides["bare"]["img_s"]}
    show("train", report, "bare_img_s", "trainer_img_s")
    report["targets"] = {"trainer >= 0.9x bare": report["trainer_vs_bare"] >= 0.9}
    publish(report, args.out)
    return report

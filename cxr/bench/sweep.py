"""`python -m cxr.bench sweep`: one frozen-backbone pass over the images against the reference's
head variants run as the real frozen-backbone sweep a user runs (`python -m cxr.train -m
experiment=... model.freeze_backbone=true`, in a subprocess), with every per-job cost it pays:
process start, decoding, one feature extraction shared through the cache, checkpoints, bootstrap
intervals, TensorBoard figures, the report. One timing of each.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from cxr import results
from cxr.bench.images import describe_source, image_source, kaggle_layout, repeat_images
from cxr.bench.options import Work, add_common, add_images, add_scale, scale_of, work_folder
from cxr.bench.runs import compose_train, head_variants, job_errors, run_sweep, sweep_jobs
from cxr.bench.timing import machine, publish, show, timed
from cxr.data import find_classes, list_files
from cxr.decoding import Split, load_split
from cxr.features import extract, extraction_batch_size
from cxr.model import build_model
from cxr.runtime import pick_device, start

HELP = "one frozen-backbone pass vs the reference's head variants as the real frozen-backbone sweep (s)"


@dataclass(frozen=True)
class Scale:
    count: int
    size: int
    batch_size: int
    epochs: int
    distinct: int
    variants: tuple[str, ...]


FULL = Scale(count=240, size=224, batch_size=32, epochs=20, distinct=40, variants=tuple(head_variants()))
QUICK = Scale(count=24, size=32, batch_size=8, epochs=1, distinct=8, variants=(FULL.variants[0], FULL.variants[-1]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scale(parser, FULL, QUICK, {
        "count": "images (links cycling over the originals; every seventh of a class is test)",
        "size": "resolution (px)", "batch_size": "images per batch", "epochs": "epochs of each head",
        "distinct": "originals to generate when no folder is given (validation takes a patient of each class: "
                    "each needs two or more)", "variants": "experiments, one job each"})
    add_images(parser)
    add_common(parser, "sweep", "seconds to a minute: two variants, one epoch, a few small images")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides of conf/train.yaml for the pass and every job (e.g. model=resnet18)")


def sweep_overrides(scale: Scale, root: Path, device: str, work: Path, extra: list[str]) -> list[str]:
    """What the sweep's jobs change in conf/train.yaml (the experiment aside)."""
    return ["model.freeze_backbone=true", "model.weights=null", "data=chest_xray", f"data.root={root}",
            f"data.image_size={scale.size}", f"data.cache_dir={work / 'sweep-cache'}", f"trainer.epochs={scale.epochs}",
            f"trainer.batch_size={scale.batch_size}", f"trainer.device={device}", "trainer.progress=false", *extra]


def one_backbone_pass(cfg, root: Path, work: Path) -> tuple[float, int]:
    """Seconds of one frozen-backbone pass over every image (train and test: all that a sweep
    extracts), as cxr.features extracts them (in batches of the same size); and how many images
    it ran on."""
    runtime = start(cfg.trainer, cfg.seed)
    items = [item for split in ("train", "test") for item in list_files(root / split, find_classes(root / split))]
    split = load_split(items, cfg.data.image_size, work / "cache", 0, "bench").to(runtime.device)
    backbone = build_model(cfg.model, cfg.data.image_size, 2).to(runtime.device).backbone

    batch_size = extraction_batch_size(cfg.trainer.eval_batch_size, cfg.data.image_size, runtime.device)

    def extract_all(split: Split = split):
        extract(backbone, split, batch_size, runtime.device, runtime.amp_dtype, cfg.trainer.channels_last)

    extract_all(Split(split.images[:8], split.labels[:8], split.paths[:8]))  # warm-up
    return timed(extract_all, runtime.device), len(split)


def measure(scale: Scale, cfg, base: list[str], root: Path, work: Work) -> dict:
    one_pass, images = one_backbone_pass(cfg, root, work.path)
    sweep_s, _ = run_sweep([f"experiment={','.join(scale.variants)}", *base], work.path / "sweep")
    jobs = sweep_jobs(work.path / "sweep")
    errors = job_errors(jobs, len(scale.variants))
    work.kept = work.kept or bool(errors)  # the failed jobs' logs stay for a look
    return {"size": scale.size, "batch_size": scale.batch_size, "images": images,
            "train_images": len(list_files(root / "train", find_classes(root / "train"))),
            "variants": list(scale.variants), "epochs": scale.epochs, "jobs": len(scale.variants),
            "jobs_ok": sum(bool(record) and record.get("status") == results.OK for _, record in jobs),
            "errors": errors, "all_jobs_ok": not errors, "one_backbone_pass_s": one_pass, "sweep_s": sweep_s,
            "per_job_beyond_one_pass_s": (sweep_s - one_pass) / len(scale.variants),
            "sweep_vs_one_pass": sweep_s / one_pass, "sweep_dir": str(work.path / "sweep") if work.kept else None}


def run(args: argparse.Namespace) -> dict:
    scale = scale_of(args, FULL, QUICK)
    device = pick_device(args.device)
    with work_folder(args.work, "sweep") as work:
        root = work.path / "kaggle"
        base = sweep_overrides(scale, root, str(device), work.path, args.overrides)
        cfgs = [compose_train([f"experiment={variant}", *base]) for variant in scale.variants]  # all checked first
        source = image_source(args.images, scale.distinct, work.path)
        items = repeat_images(source, work.path / "images", scale.count)
        report = {**machine(device), "quick": args.quick, "source": describe_source(source, items)}
        report.update(measure(scale, cfgs[0], base, kaggle_layout(items, root), work))
    show("sweep", report, "one_backbone_pass_s", "sweep_s", "per_job_beyond_one_pass_s")
    report["targets"] = {"every job of the sweep ok": report["all_jobs_ok"],
                         "sweep <= 2x one backbone pass": report["sweep_vs_one_pass"] <= 2}
    if report["errors"]:
        print(f"failed jobs (their logs: {report['sweep_dir']}):", report["errors"])
    publish(report, args.out)
    return report

"""Typed schema for the Hydra configs, their range checks and resolvers.

The dataclasses are registered in Hydra's ConfigStore as the base of `conf/train.yaml`, so a typo
(`model.dens=8`) or a wrong type (`model.dense=abc`) fails at compose time with Hydra's own
message. Ranges are checked by `validate()` before any work starts: OmegaConf merges do not run
`__post_init__`, so the checks live in one plain function instead.

Entry points that compose configs call `register_configs()` once; importing this module does not
register anything (and does not import Hydra), so `cxr.predict` stays free of Hydra's machinery.
"""

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

# the one definition of where the Hydra configs live (absolute: found from any working directory)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class ConfigError(ValueError):
    """A user mistake in the configuration: reported as one line, never a traceback."""


@dataclass
class SyntheticConfig:
    """How many images the embedded generator writes per split (class ratio near the real 1:3)."""

    train: int = 720
    val: int = 16
    test: int = 240
    min_size: int = 160
    max_size: int = 640
    seed: int = 0


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    image_size: int = 224
    # from_train: validation carved out of train, grouped by patient; official: the given val/ folder
    val_split: str = "from_train"
    val_fraction: float = 0.1
    split_seed: int = 0
    # where decoded uint8 arrays (and frozen-backbone features) are cached between runs
    cache_dir: str = "${oc.env:CXR_CACHE_DIR,${oc.env:HOME}/.cache/cxr}"
    # processes that decode JPEGs on the first pass (0 = all cores)
    decode_workers: int = 0
    # light on-device augmentation of training batches (random shift and scale)
    augment: bool = False
    # at most this many images per split (a stratified, deterministic subset) for quick checks
    limit: int | None = None
    # set for the embedded dataset: generate it under `root` on first use
    synthetic: SyntheticConfig | None = None


@dataclass
class ModelConfig:
    name: str = "resnet50"
    dense: int = 8
    hidden_layers: int = 1
    dropout: float = 0.5
    pooling: str = "flatten"  # flatten (the seed: Keras include_top=False) | avg
    weights: str | None = "imagenet"  # imagenet | null | path to a state-dict file
    freeze_backbone: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-5
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw


@dataclass
class TrainerConfig:
    epochs: int = 20
    # per process: under torchrun --nproc_per_node=N an optimizer step sees N x batch_size images
    batch_size: int = 32
    eval_batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | mps
    # off | bf16 | fp16 | auto (bf16 where the GPU supports it, else fp16 with a GradScaler; never on CPU)
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_clip: float | None = None
    monitor: str = "val/auroc"  # metric that picks best.pt; higher is better (val/loss: lower)
    threshold: str = "0.5"  # 0.5 (or any number in (0,1)) | youden: chosen on validation
    deterministic: bool = False
    resume: bool = False
    # keep last.pt after a run ends ok, so that `trainer.resume=true trainer.epochs=N+k` can extend
    # it (a finished run otherwise keeps only best.pt: last.pt holds the optimizer state too)
    keep_last: bool = False
    log_every: int = 10
    progress: bool = True
    bootstrap: int = 1000  # resamples for the 95% intervals of the test metrics (0 = off)
    tensorboard_images: bool = True  # image grid, ROC, confusion matrix, Grad-CAM at the end


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0  # the random seed (the Keras experiment cxr reproduces is "the reference")
    # sweep jobs that share one GPU at a time (hydra/launcher=per_gpu, Ray's fractional num_gpus)
    jobs_per_gpu: int = 1
    variant: str = "custom"
    description: str = ""


def slug(text: str, max_length: int = 80) -> str:
    """A folder-safe name for a job's overrides (TensorBoard shows it as the run name)."""
    text = re.sub(r"[^A-Za-z0-9=,._+-]+", "-", str(text)).strip("-")
    return (text[:max_length] or "default").rstrip("-,")


def rank_dir(path: str) -> str:
    """Hydra run dir for this process: torchrun's rank 0 gets `path`, other ranks a scratch dir.

    Every torchrun process composes its own config and would stamp its own folder; only rank 0
    writes results, so the other ranks are kept out of outputs/.
    """
    rank = int(os.environ.get("RANK", 0))
    return path if rank == 0 else os.path.join(tempfile.gettempdir(), f"cxr-rank{rank}-{os.getpid()}")


def gpu_jobs(jobs_per_gpu: int) -> int:
    """Jobs side by side on this machine: n_jobs of conf/hydra/launcher/per_gpu.yaml."""
    import torch  # here, not at the top: composing a config does not need torch otherwise

    return max(1, torch.cuda.device_count()) * int(jobs_per_gpu)


def register_configs() -> None:
    """The schema (`train_schema` in conf/train.yaml's defaults) and the `cxr_*` resolvers."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("cxr_slug", slug, replace=True)
    OmegaConf.register_new_resolver("cxr_rank_dir", rank_dir, replace=True)
    OmegaConf.register_new_resolver("cxr_gpu_jobs", gpu_jobs, replace=True)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Any) -> None:
    """Reject values out of range before any work starts (one line naming the key)."""
    m, o, t, d = cfg.model, cfg.optimizer, cfg.trainer, cfg.data
    _check(not OmegaConf.is_missing(d, "root"),
           f"data.root is not set: pass data.root=/path/to/{d.name} (the folder holding train/ and test/)")
    _check(d.limit is None or d.limit >= 4,
           f"data.limit must be null or >= 4 (two images of each class per split), got {d.limit}")
    _check(m.dense > 0, f"model.dense must be > 0, got {m.dense}")
    _check(m.hidden_layers >= 0, f"model.hidden_layers must be >= 0, got {m.hidden_layers}")
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.pooling in ("flatten", "avg"), f"model.pooling must be flatten|avg, got {m.pooling}")
    _check(o.name in ("adam", "adamw", "sgd"), f"optimizer.name must be adam|adamw|sgd, got {o.name}")
    _check(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _check(t.epochs >= 1, f"trainer.epochs must be >= 1, got {t.epochs}")
    _check(cfg.jobs_per_gpu >= 1, f"jobs_per_gpu must be >= 1, got {cfg.jobs_per_gpu}")
    _check(t.batch_size >= 1, f"trainer.batch_size must be >= 1, got {t.batch_size}")
    _check(t.eval_batch_size >= 1, f"trainer.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    _check(
        t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:"),
        f"trainer.device must be auto|cpu|cuda|mps, got {t.device}",
    )
    _check(t.amp in ("auto", "off", "bf16", "fp16"), f"trainer.amp must be auto|off|bf16|fp16, got {t.amp}")
    _check(
        t.monitor in ("val/auroc", "val/acc", "val/loss", "val/balanced_acc"),
        f"trainer.monitor must be val/auroc|val/acc|val/balanced_acc|val/loss, got {t.monitor}",
    )
    if t.threshold != "youden":
        try:
            value = float(t.threshold)
        except ValueError:
            value = -1.0
        _check(0 < value < 1, f"trainer.threshold must be youden or a number in (0, 1), got {t.threshold}")
    # ResNet50 divides the input by 32; below that the last stage has nothing left to see.
    _check(d.image_size >= 32, f"data.image_size must be >= 32 for ResNet50 (it downsamples 32x), got {d.image_size}")
    _check(
        d.val_split in ("from_train", "official"),
        f"data.val_split must be from_train|official, got {d.val_split}",
    )
    _check(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")

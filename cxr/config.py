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
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

# the one definition of where the Hydra configs live (absolute: found from any working directory)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class ConfigError(ValueError):
    """A user mistake in the configuration: reported as one line, never a traceback."""


# What a key is for, declared once on its schema field (a new key is one line):
#   describes   it describes the run: result.json's config summary, TensorBoard's HParams, the
#               sweep report's columns (`description`)
#   resumable   it may change between a run and its resumption or extension (`resumable_keys`);
#               every other key must match last.pt's
def described(default: Any = MISSING, *, factory=None, resumable: bool = False) -> Any:
    return _declared(default, factory, describes=True, resumable=resumable)


def resumable(default: Any = MISSING) -> Any:
    return _declared(default, None, resumable=True)


def _declared(default: Any, factory, **roles: bool) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata=roles)
    return field(default=default, metadata=roles)


@dataclass
class SyntheticConfig:
    """How many images the embedded generator writes per split, and in which dataset's layout.

    In the kaggle layout the classes are near the real 1:3 (NORMAL:PNEUMONIA).

    In the nih layout `train` + `val` images go to train_val_list.txt (validation is carved from it
    by the loader, as for the real dataset) and `test` to test_list.txt.
    """

    train: int = 720
    val: int = 16
    test: int = 240
    min_size: int = 160
    max_size: int = 640
    seed: int = 0
    # kaggle: root/{train,val,test}/{NORMAL,PNEUMONIA}/ (binary); nih: the ChestX-ray14 layout
    # (Data_Entry_2017.csv, train_val_list.txt, test_list.txt, images_001/images/), four findings
    layout: str = "kaggle"


@dataclass
class DataConfig:
    name: str = described(MISSING)
    # the image folder; null only for data=csv, where it defaults to the CSV's folder
    root: str | None = resumable(MISSING)
    image_size: int = described(224)
    # which grey values become 0..255 (cxr.pixels.WINDOWS): dicom (the file's own: a DICOM's VOI LUT
    # or window, else its stored range; a 16-bit PNG's bit depth; 8-bit images as they are) |
    # minmax | percentile (each image's own range)
    window: str = described("dicom")
    # from_train: validation carved out of train, grouped by patient; official: the given val/ folder
    val_split: str = "from_train"
    val_fraction: float = described(0.1)
    split_seed: int = described(0)
    # who each image's patient is: layout (its file name, table column or folder: cxr.data.splits) |
    # dicom (each DICOM header's PatientID, kept only as a salted hash)
    patient_source: str = described("layout")
    # where decoded uint8 arrays (and frozen-backbone features) are cached between runs
    cache_dir: str = resumable("${oc.env:CXR_CACHE_DIR,${oc.env:HOME}/.cache/cxr}")
    # processes that decode images on the first pass (0 = all cores)
    decode_workers: int = resumable(0)
    # on-device augmentation of training batches: none | light | strong (cxr.batches.AUGMENT)
    augment: str = described("none")
    # mirror left-right as part of the augmentation: off, since a chest is not symmetric (the
    # heart sits on the left); on only for data whose side does not matter
    hflip: bool = described(False)
    # at most this many images per split (a stratified, deterministic subset) for quick checks
    limit: int | None = described(None)
    # set for the embedded dataset: generate it under `root` on first use
    synthetic: SyntheticConfig | None = None
    # folders: root/{train,val,test}/<class>/; csv: images and labels listed in data.csv (data=csv);
    # nih, chexpert, rsna: those datasets' own files (cxr.data.layouts.LAYOUTS)
    layout: str = "folders"
    csv: str | None = resumable(None)
    path_column: str = "Path"
    label_column: str = "Label"
    patient_column: str | None = None  # null: the patient from the file name (cxr.data.splits.patient_id)
    split_column: str | None = None  # train|val|test per row; null: test carved by test_fraction
    test_fraction: float = 0.2
    # the class order (the positive class is PNEUMONIA when present, else the last); null: sorted labels
    classes: list[str] | None = None
    # multi-label data (one sigmoid per finding): data=nih, data=chexpert, or data=csv with
    # label_columns (one 1/0/-1/blank column per finding) or label_separator (findings joined in
    # label_column, e.g. "Effusion|Nodule"; no_finding names none of them)
    label_columns: list[str] | None = None
    label_separator: str | None = None
    no_finding: str = "No Finding"
    labels: list[str] | None = None  # the findings to learn, in this order; null: all of the table's
    uncertain: str = "ignore"  # a -1 cell (uncertain): ones | zeros | ignore (masked out)
    blank: str = "negative"  # a blank cell (not mentioned): negative | ignore (masked out)
    views: str = "all"  # chexpert: all | frontal


@dataclass
class ModelConfig:
    name: str = "resnet50"
    backbone: str = described("resnet50")  # a torchvision model name, see cxr.model.BACKBONES
    dense: int = described(8)
    hidden_layers: int = described(1)
    dropout: float = described(0.5)
    pooling: str = described("flatten")  # flatten (the seed: Keras include_top=False) | avg | token (vit)
    weights: str | None = described("imagenet")  # imagenet | null | path to a state-dict file
    freeze_backbone: bool = described(False)
    # null: the whole backbone trains; k: only its last k stages (0: frozen, as freeze_backbone)
    trainable_stages: int | None = described(None)


@dataclass
class OptimizerConfig:
    name: str = described("adam")  # adam | adamw | sgd
    lr: float = described(1e-5)
    weight_decay: float = described(0.0)
    momentum: float = described(0.9)  # sgd only
    betas: list[float] = described(factory=lambda: [0.9, 0.999])  # adam, adamw
    # the backbone's lr is lr x this (the head's is lr); 0 freezes it as model.freeze_backbone does
    backbone_lr_scale: float = described(1.0)


@dataclass
class SchedulerConfig:
    """The learning rate over optimizer steps, as a factor of optimizer.lr (cxr.schedule)."""

    name: str = described("none")  # none (the seed's constant lr) | cosine | step
    warmup_steps: int = described(0)  # linear warmup over the first optimizer steps
    min_lr_scale: float = described(0.0)  # cosine: the factor it ends at
    step_epochs: int = described(10)  # step: multiply by gamma every this many epochs
    gamma: float = described(0.1)


@dataclass
class TrainerConfig:
    epochs: int = described(20, resumable=True)  # resumable: a finished run can be extended
    # per process: under torchrun --nproc_per_node=N an optimizer step sees N x batch_size images
    batch_size: int = described(32)
    eval_batch_size: int = resumable(128)
    device: str = resumable("auto")  # auto | cpu | cuda | mps
    # off | bf16 | fp16 | auto (bf16 where the GPU supports it, else fp16 with a GradScaler; never on CPU)
    amp: str = described("auto")
    channels_last: bool = True
    compile: bool = False
    grad_clip: float | None = described(None)
    # optimizer steps every this many batches (gradients summed): batch_size x accumulate_steps
    # images per step, for a large backbone on a small GPU
    accumulate_steps: int = described(1)
    # stop when trainer.monitor has not improved for this many epochs (null: train every epoch)
    patience: int | None = described(None)
    monitor: str = described("val/auroc")  # metric that picks best.pt (cxr.engine.MONITORS)
    threshold: str = described("0.5")  # 0.5 (or any number in (0,1)) | youden: chosen on validation
    # none | temperature: logits divided by a temperature fitted on the best epoch's validation
    # logits, the threshold then chosen again on the calibrated validation probabilities (cxr.calibration)
    calibration: str = described("none")
    # deterministic algorithms, cuDNN autotuning off: a resumed run ends with exactly the metrics of
    # an uninterrupted one on the CPU; on a GPU up to the CUDA kernels that have no deterministic
    # version (cross-entropy, average pooling's backward), which run with a warning (cxr.runtime)
    deterministic: bool = False
    resume: bool = resumable(False)
    # a finished run whose config differs from this one's (an edited conf/ file, say) is refused
    # on resumption (a sweep's re-run), unless this asks to re-run it from scratch with this config
    rerun_changed: bool = resumable(False)
    # keep last.pt after a run ends ok, so that `trainer.resume=true trainer.epochs=N+k` can extend
    # it (a finished run otherwise keeps only best.pt: last.pt holds the optimizer state too)
    keep_last: bool = resumable(False)
    log_every: int = resumable(10)
    progress: bool = resumable(True)
    bootstrap: int = resumable(1000)  # resamples for the 95% intervals of the test metrics (0 = off)
    # multi-label: none, or balanced (each finding's BCE positives weighted negatives/positives in train)
    pos_weight: str = described("none")
    tensorboard_images: bool = resumable(True)  # image grid, ROC, confusion matrix, Grad-CAM at the end


@dataclass
class TrainConfig:
    # (in the order a run's description lists them: model, optimizer, schedule, data, trainer)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = described(0)  # the random seed (the Keras experiment cxr reproduces is "the reference")
    # sweep jobs that share one GPU at a time (hydra/launcher=per_gpu, Ray's fractional num_gpus)
    jobs_per_gpu: int = 1
    variant: str = described("custom")
    description: str = ""


@dataclass
class EvalConfig:
    """`python -m cxr.evaluate`: which images of the target data, and how its labels meet the model's."""

    # test: the target's test split (the layout's own, or carved by patient as training carves it);
    # all: every split of it (a dataset the model never saw: train, val and test alike)
    split: str = "test"
    # which of the model's outputs scores which target label: {output: label, or [labels]} (null:
    # none). An entry pairs both ways (a model output named by its first label scores a target
    # label named by its key); names alike on both sides pair themselves (cxr.transfer). Presets:
    # conf/labels/ (labels=pneumonia). Typed Any so that a dict can be passed whole on the command
    # line (eval.labels={PNEUMONIA:Pneumonia}); `validate_evaluation` checks its shape
    labels: Any = None
    # {data.name: data.root}, for a multirun over datasets (data=nih,chexpert); data.root wins
    roots: Any = None


@dataclass
class EvaluateConfig:
    """The schema of conf/evaluate.yaml: the training data groups compose into it unchanged."""

    checkpoint: str = MISSING  # a run folder or its best.pt
    data: DataConfig = field(default_factory=DataConfig)
    # device, eval_batch_size and bootstrap are read (the rest: what the data presets set for training)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # what the data presets say about training (model.weights, optimizer.lr): unused, the
    # checkpoint holds the model
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


def keys_with(role: str, schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """The dotted keys whose schema field is declared with `role` (describes | resumable), in
    declaration order."""
    keys = []
    for spec in fields(schema):
        if is_dataclass(spec.type):
            keys += keys_with(role, spec.type, f"{prefix}{spec.name}.")
        elif spec.metadata.get(role):
            keys.append(prefix + spec.name)
    return keys


def description(cfg: Any) -> dict[str, Any]:
    """What describes a run, by dotted key: the values of every `described` key (lists as lists)."""
    values = {}
    for key in keys_with("describes"):
        value = OmegaConf.select(cfg, key)
        values[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return values


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


def machine_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or a cgroup's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_gpus() -> int:
    import torch  # here, not at the top: composing a config does not need torch otherwise

    return torch.cuda.device_count()


def gpu_jobs(jobs_per_gpu: int) -> int:
    """Jobs side by side on this machine: n_jobs of conf/hydra/launcher/per_gpu.yaml."""
    return max(1, machine_gpus()) * int(jobs_per_gpu)


def ray_job_cpus(instance_cpus: int) -> int:
    """CPUs a Ray job asks for (conf/hydra/launcher/ray_local.yaml): 4, at most the instance's."""
    return max(1, min(4, int(instance_cpus)))


def ray_job_gpus(instance_gpus: int, jobs_per_gpu: int) -> float:
    """GPUs a Ray job asks for: 1 / jobs_per_gpu (packing), or none where the instance has none."""
    return 1 / int(jobs_per_gpu) if instance_gpus else 0


def ray_unschedulable(remote: dict, instance: dict) -> str | None:
    """Why a Ray job asking for `remote` (num_cpus, num_gpus; Ray's defaults 1 and 0) can never
    start on a one-node Ray instance of `instance` resources: one line naming what to set, or None.
    (Ray would keep such a job pending for ever, printing "No available node types can fulfill
    resource request".)"""
    for resource, unit, default in (("num_cpus", "CPU", 1), ("num_gpus", "GPU", 0)):
        asked = default if remote.get(resource) is None else remote[resource]
        has = instance[resource]
        if asked > has:
            return (f"each Ray job asks for {asked} {unit}(s) (hydra.launcher.ray.remote.{resource}) but the "
                    f"Ray instance has {has} (hydra.launcher.ray.init.{resource}): set "
                    f"hydra.launcher.ray.remote.{resource}={has}")
    return None


def register_configs() -> None:
    """The schema (`train_schema` in conf/train.yaml's defaults) and the `cxr_*` resolvers."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    OmegaConf.register_new_resolver("cxr_slug", slug, replace=True)
    OmegaConf.register_new_resolver("cxr_rank_dir", rank_dir, replace=True)
    OmegaConf.register_new_resolver("cxr_gpu_jobs", gpu_jobs, replace=True)
    OmegaConf.register_new_resolver("cxr_machine_cpus", machine_cpus, replace=True)
    OmegaConf.register_new_resolver("cxr_machine_gpus", machine_gpus, replace=True)
    OmegaConf.register_new_resolver("cxr_ray_job_cpus", ray_job_cpus, replace=True)
    OmegaConf.register_new_resolver("cxr_ray_job_gpus", ray_job_gpus, replace=True)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Any) -> None:
    """Reject values out of range before any work starts (one line naming the key)."""
    from cxr.calibration import CALIBRATIONS  # torch: only when validating
    from cxr.engine import MONITORS
    from cxr.model import OPTIMIZERS

    m, o, t, d = cfg.model, cfg.optimizer, cfg.trainer, cfg.data
    validate_data(d)
    _check(m.dense > 0, f"model.dense must be > 0, got {m.dense}")
    _check(m.hidden_layers >= 0, f"model.hidden_layers must be >= 0, got {m.hidden_layers}")
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    validate_model(m, d.image_size)
    _check(o.name in OPTIMIZERS, f"optimizer.name must be {'|'.join(OPTIMIZERS)}, got {o.name}")
    _check(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.backbone_lr_scale >= 0, f"optimizer.backbone_lr_scale must be >= 0, got {o.backbone_lr_scale}")
    _check(not (m.freeze_backbone and o.backbone_lr_scale not in (0, 1)),
           f"optimizer.backbone_lr_scale={o.backbone_lr_scale} trains the backbone: pass "
           "model.freeze_backbone=false with it (the embedded dataset's recipe freezes it)")
    validate_recipe(cfg)
    _check(t.epochs >= 1, f"trainer.epochs must be >= 1, got {t.epochs}")
    _check(cfg.jobs_per_gpu >= 1, f"jobs_per_gpu must be >= 1, got {cfg.jobs_per_gpu}")
    _check(t.batch_size >= 1, f"trainer.batch_size must be >= 1, got {t.batch_size}")
    _check(t.eval_batch_size >= 1, f"trainer.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    validate_device(t.device)
    _check(t.amp in ("auto", "off", "bf16", "fp16"), f"trainer.amp must be auto|off|bf16|fp16, got {t.amp}")
    _check(t.pos_weight in ("none", "balanced"), f"trainer.pos_weight must be none|balanced, got {t.pos_weight}")
    _check(t.monitor in MONITORS, f"trainer.monitor must be {'|'.join(MONITORS)}, got {t.monitor}")
    _check(t.calibration in CALIBRATIONS,
           f"trainer.calibration must be {'|'.join(CALIBRATIONS)}, got {t.calibration}")
    if t.threshold != "youden":
        try:
            value = float(t.threshold)
        except ValueError:
            value = -1.0
        _check(0 < value < 1, f"trainer.threshold must be youden or a number in (0, 1), got {t.threshold}")
    # the CNNs divide the input by 32; below that the last stage has nothing left to see
    _check(d.image_size >= 32, f"data.image_size must be >= 32 (the backbones downsample 32x), got {d.image_size}")
    _check(
        d.val_split in ("from_train", "official"),
        f"data.val_split must be from_train|official, got {d.val_split}",
    )
    _check(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")


def validate_device(device: str) -> None:
    _check(device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:"),
           f"trainer.device must be auto|cpu|cuda|mps, got {device}")


def validate_evaluation(cfg: Any) -> None:
    """conf/evaluate.yaml's values: a checkpoint, the target data, the split, the device."""
    _check(not OmegaConf.is_missing(cfg, "checkpoint"), "checkpoint is not set: pass checkpoint=RUN_DIR "
           "(a run folder of python -m cxr.train) or checkpoint=.../best.pt")
    validate_data(cfg.data)
    _check(cfg.eval.split in ("test", "all"), f"eval.split must be test|all, got {cfg.eval.split}")
    validate_device(cfg.trainer.device)
    _check(cfg.trainer.eval_batch_size >= 1, f"trainer.eval_batch_size must be >= 1, got {cfg.trainer.eval_batch_size}")
    _check(cfg.trainer.bootstrap >= 0, f"trainer.bootstrap must be >= 0, got {cfg.trainer.bootstrap}")
    labels = cfg.eval.labels
    _check(labels is None or (OmegaConf.is_dict(labels) and all(
        isinstance(value, str) or (OmegaConf.is_list(value) and value and all(isinstance(v, str) for v in value))
        for value in labels.values())),
        f"eval.labels must map a model output to a target label or a list of them, e.g. "
        f"eval.labels={{PNEUMONIA:Pneumonia}}, got {labels}")
    _check(cfg.eval.roots is None or OmegaConf.is_dict(cfg.eval.roots),
           f"eval.roots must map a data.name to its data.root, e.g. eval.roots={{nih:/data/nih}}, got {cfg.eval.roots}")


def validate_data(d: Any) -> None:
    """The layout and what it needs: a root, a CSV, the multi-label policies; the window and the
    patients' source."""
    from cxr.data import LAYOUTS  # torch (through the decoding cache): only when validating
    from cxr.data.splits import PATIENT_SOURCES
    from cxr.pixels import WINDOWS

    _check(d.layout in LAYOUTS, f"data.layout must be {'|'.join(LAYOUTS)}, got {d.layout}")
    _check(d.window in WINDOWS, f"data.window must be {'|'.join(WINDOWS)}, got {d.window}")
    _check(d.patient_source in PATIENT_SOURCES,
           f"data.patient_source must be {'|'.join(PATIENT_SOURCES)}, got {d.patient_source}")
    if d.layout == "csv":
        _check(d.csv is not None, "data.csv is not set: pass data.csv=/path/to/labels.csv")
    else:
        _check(not OmegaConf.is_missing(d, "root") and d.root is not None,
               f"data.root is not set: pass data.root=/path/to/{d.name} "
               f"({'the folder holding train/ and test/' if d.layout == 'folders' else 'the dataset folder'})")
    _check(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    _check(d.limit is None or d.limit >= 4,
           f"data.limit must be null or >= 4 (two images of each class per split), got {d.limit}")
    _check(d.uncertain in ("ones", "zeros", "ignore"), f"data.uncertain must be ones|zeros|ignore, got {d.uncertain}")
    _check(d.blank in ("negative", "ignore"), f"data.blank must be negative|ignore, got {d.blank}")
    _check(d.views in ("all", "frontal"), f"data.views must be all|frontal, got {d.views}")
    _check(not (d.label_columns and d.label_separator is not None),
           "data.label_columns and data.label_separator both set: findings come either from one column per "
           "finding or from one column of joined findings")
    _check(d.synthetic is None or d.synthetic.layout in ("kaggle", "nih"),
           f"data.synthetic.layout must be kaggle|nih, got {d.synthetic and d.synthetic.layout}")
    _check(d.synthetic is None or (d.synthetic.layout == "nih") == (d.layout == "nih"),
           "data.synthetic.layout=nih goes with data.layout=nih (data=synthetic_multilabel), kaggle with folders")


def validate_model(m: Any, image_size: int) -> None:
    """The backbone exists, its pooling suits its family, the image size suits its patches."""
    from cxr.model import BACKBONES, PATCH, family_of  # torch and torchvision: only when validating

    _check(m.backbone in BACKBONES, f"model.backbone must be one of {'|'.join(BACKBONES)}, got {m.backbone}")
    poolings = family_of(m.backbone).poolings
    _check(m.pooling in poolings, f"model.pooling must be {'|'.join(poolings)} for {m.backbone}, got {m.pooling}")
    patch = PATCH.get(m.backbone)
    _check(patch is None or image_size % patch == 0,
           f"data.image_size must be a multiple of {patch} for {m.backbone} (its patch side), got {image_size}")
    _check(m.trainable_stages is None or m.trainable_stages >= 0,
           f"model.trainable_stages must be null or >= 0, got {m.trainable_stages}")
    _check(not (m.freeze_backbone and m.trainable_stages),
           f"model.trainable_stages={m.trainable_stages} trains part of the backbone: pass "
           "model.freeze_backbone=false with it (the embedded dataset's recipe freezes it)")


def validate_recipe(cfg: Any) -> None:
    """The schedule, early stopping, accumulation and augmentation settings."""
    from cxr.batches import AUGMENT  # torch: only when validating
    from cxr.schedule import SCHEDULES

    s, t, d = cfg.scheduler, cfg.trainer, cfg.data
    _check(s.name in SCHEDULES, f"scheduler.name must be {'|'.join(SCHEDULES)}, got {s.name}")
    _check(s.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0, got {s.warmup_steps}")
    _check(0 <= s.min_lr_scale <= 1, f"scheduler.min_lr_scale must be in [0, 1], got {s.min_lr_scale}")
    _check(s.step_epochs >= 1, f"scheduler.step_epochs must be >= 1, got {s.step_epochs}")
    _check(0 < s.gamma <= 1, f"scheduler.gamma must be in (0, 1], got {s.gamma}")
    _check(t.patience is None or t.patience >= 1, f"trainer.patience must be null or >= 1, got {t.patience}")
    _check(t.accumulate_steps >= 1, f"trainer.accumulate_steps must be >= 1, got {t.accumulate_steps}")
    _check(d.augment in AUGMENT, f"data.augment must be {'|'.join(AUGMENT)}, got {d.augment}")


def effective(cfg: Any) -> Any:
    """The config as it runs: optimizer.backbone_lr_scale=0 and model.trainable_stages=0 freeze the
    backbone, and do so the one way a frozen backbone runs (model.freeze_backbone=true: cached
    features, checkpoints of the head). Stated in the config, so that checkpoints, the feature
    cache and result.json all see it."""
    if cfg.model.freeze_backbone or not (cfg.optimizer.backbone_lr_scale == 0 or cfg.model.trainable_stages == 0):
        return cfg
    return OmegaConf.merge(cfg, {"model": {"freeze_backbone": True}})

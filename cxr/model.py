"""The reference network on any torchvision backbone, and its optimizer.

backbone -> Flatten (or pooled features, or a transformer's class token) -> feature
standardisation -> [Dense(n) -> ReLU -> Dropout] x k -> output, and the optimizer over whatever of
it trains (kept beside the model, as nanoGPT keeps `configure_optimizers`).

Backbones come from torchvision's model registry (`torchvision.models.get_model`). What differs
between families (where the classifier and the pooling sit, which submodules are the stages that
`model.trainable_stages` unfreezes and Grad-CAM hooks) is stated once, in FAMILIES.
"""

import functools
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings


class WeightsError(Exception):
    """Asked-for weights cannot be had: reported as one line, never a silent random init."""


@dataclass(frozen=True)
class Family:
    """How one family of torchvision networks is turned into a feature extractor."""

    classifier: str  # the ImageNet classifier's attribute path: replaced by Identity
    pool: str | None  # the global pooling's attribute, replaced by Identity for pooling=flatten
    poolings: tuple[str, ...]  # the model.pooling values it supports
    stages: Callable[[nn.Module], list[str]]  # its stages' module paths, input to output
    channels_last_maps: bool = False  # stages output (B, H, W, C) instead of (B, C, H, W)
    no_grad_cam: str | None = None  # why Grad-CAM cannot be had, where it cannot


def _named(*paths: str) -> Callable[[nn.Module], list[str]]:
    return lambda net: list(paths)


def _indexed(prefix: str, first: int = 1) -> Callable[[nn.Module], list[str]]:
    """features.1 .. features.N-1 of a Sequential (features.0 is the stem)."""
    return lambda net: [f"{prefix}.{name}" for name in list(net.get_submodule(prefix)._modules)[first:]]


_PYRAMID = _named("features.1", "features.3", "features.5", "features.7")  # between them: downsampling
FAMILIES = {
    "resnet": Family("fc", "avgpool", ("flatten", "avg"), _named("layer1", "layer2", "layer3", "layer4")),
    "regnet": Family("fc", "avgpool", ("flatten", "avg"),
                     _named(*(f"trunk_output.block{i}" for i in range(1, 5)))),
    # its forward pools by a function, not a module: flatten rebuilds it (see build_backbone)
    "densenet": Family("classifier", None, ("flatten", "avg"),
                       _named(*(f"features.denseblock{i}" for i in range(1, 5)))),
    "efficientnet": Family("classifier", "avgpool", ("flatten", "avg"), _indexed("features")),
    "convnext": Family("classifier.2", "avgpool", ("flatten", "avg"), _PYRAMID),
    "swin": Family("head", "avgpool", ("flatten", "avg"), _PYRAMID, channels_last_maps=True),
    "vit": Family("heads", None, ("token",), _indexed("encoder.layers", first=0),
                  no_grad_cam="its only convolution is the 16x16 patch embedding; attention, not "
                              "convolution, mixes the patches after it, so no layer keeps a "
                              "convolutional feature map to weight"),
}
BACKBONES = {"resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet", "resnet101": "resnet",
             "densenet121": "densenet", "efficientnet_b0": "efficientnet",
             "efficientnet_v2_s": "efficientnet", "convnext_tiny": "convnext",
             "regnet_y_1_6gf": "regnet", "vit_b_16": "vit", "swin_t": "swin"}
PATCH = {"vit_b_16": 16}  # transformers whose input side must be a multiple of their patch


def family_of(backbone: str) -> Family:
    return FAMILIES[BACKBONES[backbone]]


class FeatureNorm(nn.Module):
    """Per-feature standardisation between backbone and head: (x - mean) / std.

    Identity (mean 0, std 1) while the backbone trains. With a frozen backbone it holds the
    training features' statistics, as a linear probe standardises its inputs: raw random-init
    ResNet50 features span orders of magnitude, and a head on them at lr 1e-4 collapsed to one
    constant answer from the first epoch.
    """

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def fit(self, chunks: Iterable[torch.Tensor]) -> None:
        """Take the mean and (unbiased) std of the features that arrive in `chunks` (n, F) of rows;
        constant features keep a std of 1.

        Chunk by chunk, so a training split larger than memory is read once and never held whole:
        each chunk's float64 mean and sum of squared deviations are merged into the running ones
        (Chan et al.'s pairwise update, free of the cancellation of a sum of squares).
        """
        count, mean, deviations = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for chunk in chunks:
            x = chunk.double().cpu()
            chunk_mean = x.mean(0)
            delta, total = chunk_mean - mean, count + len(x)
            mean = mean + delta * len(x) / total
            deviations = deviations + ((x - chunk_mean) ** 2).sum(0) + delta ** 2 * count * len(x) / total
            count = total
        std = (deviations / (count - 1)).sqrt()
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # divided in place: the same numbers, one (batch, F) float32 temporary instead of two
        # (15 -> 8 ms for 32 rows of 224-px ResNet50 flatten features on one CPU thread)
        return torch.sub(x, self.mean).div_(self.std)

    def standardises(self) -> bool:
        """Whether it holds fitted statistics (a frozen backbone), rather than the identity."""
        return bool(self.mean.any() or (self.std != 1).any())


class Classifier(nn.Module):
    """`backbone` maps images to a feature vector, `feature_norm` scales it, `head` gives logits.

    Kept as parts so the frozen-backbone path can cache backbone features and train
    `feature_norm` + `head` alone, and so Grad-CAM can hook the backbone's stages. Plain attributes
    (not part of the weights): `family` names the backbone's entry in FAMILIES; `frozen_digest` is
    a frozen backbone's `weights_digest`, taken once when it is built (it never changes: the
    feature cache's key and the checkpoints' reference to the backbone both read it), else None.
    """

    def __init__(self, backbone: nn.Module, feature_norm: FeatureNorm, head: nn.Module,
                 family: str = "resnet"):
        super().__init__()
        self.backbone = backbone
        self.feature_norm = feature_norm
        self.head = head
        self.family = family
        self.frozen_digest: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_norm(self.backbone(x)))

    def train(self, mode: bool = True) -> "Classifier":
        """Train mode for what trains; the backbone's frozen parts (model.trainable_stages, a frozen
        backbone) stay in eval mode, as Keras' trainable=False layers do: their BatchNorm layers
        keep normalising with, and never update, the running statistics they were built with.
        Here, not in the training loop, so that every caller of train() (DDP and torch.compile
        wrappers pass it on) gets it."""
        super().train(mode)
        if mode:
            for part in frozen_parts(self.backbone):
                part.eval()
        return self

    def top(self) -> nn.Sequential:
        """What sits on the backbone's features: what trains when the backbone is frozen."""
        return nn.Sequential(self.feature_norm, self.head)

    def stages(self) -> list[str]:
        """The backbone's stage paths that exist in it, input to output."""
        names = dict(self.backbone.named_modules())
        return [path for path in FAMILIES[self.family].stages(self.backbone) if path in names]


def frozen_parts(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of `module` whose parameters all exist and none of which trains."""
    parameters = list(module.parameters())
    if parameters and not any(parameter.requires_grad for parameter in parameters):
        return [module]
    return [part for child in module.children() for part in frozen_parts(child)]


def imagenet_state_dict(backbone: str) -> dict:
    """torchvision's default ImageNet weights of `backbone`, from torch's cache or downloaded."""
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # offline, proxy, truncated file: all mean "not available here"
        raise WeightsError(
            f"ImageNet weights of {backbone} are not in torch's cache ({cached}) and could not be "
            f"downloaded ({type(error).__name__}); copy {os.path.basename(weights.url)} there, or pass "
            "model.weights=null (random init) or model.weights=/path/to/state_dict.pt"
        ) from None


def backbone_state_dict(weights: str | None, backbone: str) -> dict | None:
    if weights is None:
        return None
    if weights == "imagenet":
        return imagenet_state_dict(backbone)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, pickled code
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightsError(f"model.weights {path} is not a readable state-dict file ({type(error).__name__}: "
                           f"{first_line[:80]})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights {path} holds a {type(state).__name__}, not a state dict")
    # our own checkpoints keep the backbone under model/backbone.*
    if "model" in state and isinstance(state["model"], dict):
        state = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    return state


def load_backbone_weights(net: nn.Module, state: dict, weights: str, backbone: str,
                          image_size: int) -> None:
    """`state` into `net` (still with its ImageNet classifier, whose weights are not taken)."""
    classifier = family_of(backbone).classifier + "."
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    if backbone in PATCH and "encoder.pos_embedding" in state:
        # ImageNet ViTs hold one position per 16x16 patch of 224 px: resampled to this size
        state = interpolate_embeddings(image_size, PATCH[backbone], state)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        mismatch = re.search(r"size mismatch for ([\w.]+)", str(error))
        raise WeightsError(f"model.weights {weights} does not fit {backbone} (the shape of "
                           f"{mismatch.group(1) if mismatch else 'a tensor'} differs)") from None
    if [k for k in missing if not k.startswith(classifier)] or unexpected:
        raise WeightsError(f"model.weights {weights} is not a {backbone} state dict "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def strip_classifier(net: nn.Module, backbone: str, pooling: str) -> nn.Module:
    """The network up to its features: the ImageNet classifier gone, and with pooling=flatten
    the global pooling too (Keras' include_top=False without pooling, as the reference's Flatten
    layer sees it: ResNet50's whole 2048 x 7 x 7 map at 224 px)."""
    family = family_of(backbone)
    parent, _, name = family.classifier.rpartition(".")
    setattr(net.get_submodule(parent), name, nn.Identity())
    if pooling == "flatten" and family.pool is not None:
        setattr(net, family.pool, nn.Identity())
    if pooling == "flatten" and BACKBONES[backbone] == "densenet":
        # DenseNet pools in its forward(); the same modules, in order, without the pooling
        # (the parameter names stay those of torchvision's DenseNet)
        net = nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU(), flatten=nn.Flatten()))
    return net


def build_backbone(backbone: str, weights: str | None, pooling: str, image_size: int) -> nn.Module:
    """torchvision's `backbone` with the given weights, mapping images to a feature vector."""
    options = {"image_size": image_size} if backbone in PATCH else {}
    net = torchvision.models.get_model(backbone, weights=None, **options)
    state = backbone_state_dict(weights, backbone)
    if state is not None:
        load_backbone_weights(net, state, weights, backbone, image_size)
    return strip_classifier(net, backbone, pooling)


@torch.no_grad()
def feature_count(backbone: nn.Module, image_size: int) -> int:
    """Length of the backbone's output vector, from one forward pass of a blank image: the same
    for every family and size (eval mode, so BatchNorm's running statistics are not touched)."""
    was_training = backbone.training
    backbone.eval()
    count = backbone(torch.zeros(1, 3, image_size, image_size)).shape[1]
    backbone.train(was_training)
    return count


def build_head(in_features: int, dense: int, hidden_layers: int, dropout: float, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(in_features, dense), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = dense
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def seeded_backbone(backbone: str, weights: str | None, pooling: str, image_size: int, init_seed: int) -> nn.Module:
    """`build_backbone` with a random init drawn from `init_seed` alone, so that the same backbone
    can be rebuilt from a checkpoint that stores only the head (frozen backbone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_backbone(backbone, weights, pooling, image_size)


@functools.lru_cache(maxsize=1)
def frozen_backbone(backbone: str, weights: str | None, pooling: str, image_size: int,
                    init_seed: int) -> tuple[nn.Module, str]:
    """A frozen backbone and its digest, built once per process for the jobs of a sweep that share
    it (the basic launcher runs them one after another in one process): nothing ever changes a
    frozen backbone's weights, and building a ResNet50 and hashing it took a fifth of a job."""
    net = seeded_backbone(backbone, weights, pooling, image_size, init_seed).requires_grad_(False)
    return net, weights_digest(net)


def build_model(model_cfg, image_size: int, num_classes: int, init_seed: int = 0) -> Classifier:
    """The classifier. A frozen backbone with ImageNet or random weights is shared by the runs of a
    process that ask for the same one (`frozen_backbone`); a weights file is read every time."""
    key = (model_cfg.backbone, model_cfg.weights, model_cfg.pooling, image_size, init_seed)
    digest = None
    if model_cfg.freeze_backbone and model_cfg.weights in (None, "imagenet"):
        backbone, digest = frozen_backbone(*key)
    else:
        backbone = seeded_backbone(*key)
    features = feature_count(backbone, image_size)
    head = build_head(features, model_cfg.dense, model_cfg.hidden_layers, model_cfg.dropout, num_classes)
    model = Classifier(backbone, FeatureNorm(features), head, BACKBONES[model_cfg.backbone])
    if model_cfg.freeze_backbone:
        model.frozen_digest = digest or weights_digest(backbone.requires_grad_(False))
    elif model_cfg.trainable_stages is not None:
        train_last_stages(model, model_cfg.trainable_stages)
    return model


def train_last_stages(model: Classifier, count: int) -> None:
    """Only the last `count` stages of the backbone train, with everything after them (final
    norms); the stem and earlier stages stay as initialised. Parameters are registered in forward
    order in torchvision's networks, so "after" is "later in named_parameters()"."""
    stages = model.stages()
    first = stages[max(0, len(stages) - count)] + "."
    trainable = False
    for name, parameter in model.backbone.named_parameters():
        trainable = trainable or name.startswith(first)
        parameter.requires_grad_(trainable)


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (about 0.05 s for ResNet50 on a CPU)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def parameter_groups(module: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """The head (and anything that is not the backbone) at `lr`, the backbone's trainable
    parameters at lr x backbone_lr_scale: discriminative fine-tuning, as ULMFiT and timm do."""
    backbone = getattr(module, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in backbone_ids], "lr": lr, "name": "head"},
              {"params": [p for p in trainable if id(p) in backbone_ids], "lr": lr * backbone_lr_scale,
               "name": "backbone"}]
    return [group for group in groups if group["params"]]


def _fused(groups: list[dict]) -> bool | None:
    """fused: one kernel updates every tensor, instead of ~10 small ops per tensor that each launch
    a kernel (GPU) or wait for the threads of a parallel region (CPU: 4x faster head-only steps)."""
    params = [p for group in groups for p in group["params"]]
    return True if all(p.device.type in ("cpu", "cuda") for p in params) else None


def _adam_like(optimizer: type[torch.optim.Optimizer]) -> Callable[[list[dict], object], torch.optim.Optimizer]:
    return lambda groups, cfg: optimizer(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                         fused=_fused(groups))


# optimizer.name -> the optimizer over parameter groups, from conf/optimizer/*.yaml's keys
# (config validation reads the names from here too)
OPTIMIZERS = {
    "adam": _adam_like(torch.optim.Adam),
    "adamw": _adam_like(torch.optim.AdamW),
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                               weight_decay=cfg.weight_decay),
}


def build_optimizer(module: nn.Module, cfg) -> torch.optim.Optimizer:
    """The configured optimizer over `module`'s trainable parameters, in parameter groups."""
    return OPTIMIZERS[cfg.name](parameter_groups(module, cfg.lr, cfg.backbone_lr_scale), cfg)

"""The reference network and its optimizer.

ResNet50 backbone -> Flatten -> feature standardisation -> [Dense(n) -> ReLU -> Dropout] x k -> output,
and the optimizer over whatever of it trains (kept beside the model, as nanoGPT keeps
`configure_optimizers`).
"""

import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50


class WeightsError(Exception):
    """Asked-for weights cannot be had: reported as one line, never a silent random init."""


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

    def fit(self, features: torch.Tensor) -> None:
        """Take the statistics of `features` (N, F); constant features keep a std of 1."""
        self.mean.copy_(features.mean(0))
        std = features.std(0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """`backbone` maps images to a feature vector, `feature_norm` scales it, `head` gives logits.

    Kept as parts so the frozen-backbone path can cache backbone features and train
    `feature_norm` + `head` alone, and so Grad-CAM can hook the last convolutional stage.
    """

    def __init__(self, backbone: nn.Module, feature_norm: FeatureNorm, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.feature_norm = feature_norm
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_norm(self.backbone(x)))

    def top(self) -> nn.Sequential:
        """What sits on the backbone's features: what trains when the backbone is frozen."""
        return nn.Sequential(self.feature_norm, self.head)


def imagenet_state_dict() -> dict:
    """torchvision's ImageNet ResNet50 weights from torch's cache, downloading them if allowed."""
    weights = ResNet50_Weights.IMAGENET1K_V2
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # offline, proxy, truncated file: all mean "not available here"
        raise WeightsError(
            f"ImageNet weights are not in torch's cache ({cached}) and could not be downloaded "
            f"({type(error).__name__}); copy {os.path.basename(weights.url)} there, or pass "
            "model.weights=null (random init) or model.weights=/path/to/state_dict.pt"
        ) from None


def backbone_state_dict(weights: str | None) -> dict | None:
    if weights is None:
        return None
    if weights == "imagenet":
        return imagenet_state_dict()
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


def build_backbone(weights: str | None, pooling: str) -> nn.Module:
    net = resnet50(weights=None)
    state = backbone_state_dict(weights)
    if state is not None:
        # the ImageNet classifier (fc.*) is replaced by the reference head
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as error:  # same names, other shapes
            mismatch = re.search(r"size mismatch for ([\w.]+)", str(error))
            raise WeightsError(f"model.weights {weights} does not fit ResNet50 (the shape of "
                               f"{mismatch.group(1) if mismatch else 'a tensor'} differs)") from None
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise WeightsError(f"model.weights {weights} is not a ResNet50 state dict "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.fc = nn.Identity()
    if pooling == "flatten":
        # Keras' include_top=False without pooling: the whole 2048 x h x w map is flattened
        # (100,352 features at 224 px), as the reference's Flatten layer does.
        net.avgpool = nn.Identity()
    return net


def feature_count(pooling: str, image_size: int) -> int:
    """Length of the backbone's output vector: ResNet50 halves the input five times (ceil)."""
    side = image_size
    for _ in range(5):
        side = (side + 1) // 2
    return 2048 * side * side if pooling == "flatten" else 2048


def build_head(in_features: int, dense: int, hidden_layers: int, dropout: float, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(in_features, dense), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = dense
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def build_model(model_cfg, image_size: int, num_classes: int, init_seed: int = 0) -> Classifier:
    """The classifier; a random backbone init is drawn from `init_seed` alone, so that the same
    backbone can be rebuilt from a checkpoint that stores only the head (frozen backbone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        backbone = build_backbone(model_cfg.weights, model_cfg.pooling)
    features = feature_count(model_cfg.pooling, image_size)
    head = build_head(features, model_cfg.dense, model_cfg.hidden_layers, model_cfg.dropout, num_classes)
    if model_cfg.freeze_backbone:
        backbone.requires_grad_(False)
    return Classifier(backbone, FeatureNorm(features), head)


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (about 0.05 s for ResNet50 on a CPU)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def build_optimizer(module: nn.Module, cfg) -> torch.optim.Optimizer:
    """The configured optimizer over `module`'s trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    # fused: one kernel updates every tensor, instead of ~10 small ops per tensor that each launch
    # a kernel (GPU) or wait for the threads of a parallel region (CPU: 4x faster head-only steps)
    fused = True if all(p.device.type in ("cpu", "cuda") for p in params) else None
    return optimizer(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                     fused=fused)

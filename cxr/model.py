"""The seed's network: ResNet50 backbone -> Flatten -> [Dense(n) -> ReLU -> Dropout] x k -> output."""

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50


class WeightsError(Exception):
    """Asked-for weights cannot be had: reported as one line, never a silent random init."""


class Classifier(nn.Module):
    """`backbone` maps images to a feature vector; `head` maps features to class logits.

    Kept as two parts so the frozen-backbone path can cache backbone features and train the head
    alone, and so Grad-CAM can hook the last convolutional stage (`backbone.layer4`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


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
    state = torch.load(path, map_location="cpu", weights_only=True)
    # our own checkpoints keep the backbone under model/backbone.*
    if isinstance(state, dict) and "model" in state:
        state = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    return state


def build_backbone(weights: str | None, pooling: str) -> nn.Module:
    net = resnet50(weights=None)
    state = backbone_state_dict(weights)
    if state is not None:
        # the ImageNet classifier (fc.*) is replaced by the seed's head
        missing, unexpected = net.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise WeightsError(f"model.weights {weights} is not a ResNet50 state dict "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    net.fc = nn.Identity()
    if pooling == "flatten":
        # Keras' include_top=False without pooling: the whole 2048 x h x w map is flattened
        # (100,352 features at 224 px), as the seed's Flatten layer does.
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


def build_model(model_cfg, image_size: int, num_classes: int) -> Classifier:
    backbone = build_backbone(model_cfg.weights, model_cfg.pooling)
    head = build_head(feature_count(model_cfg.pooling, image_size), model_cfg.dense,
                      model_cfg.hidden_layers, model_cfg.dropout, num_classes)
    if model_cfg.freeze_backbone:
        backbone.requires_grad_(False)
    return Classifier(backbone, head)

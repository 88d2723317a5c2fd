"""Every listed torchvision backbone as a config choice: built, explained, refused where it cannot work."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cxr.config import CONF_DIR, ConfigError, effective, validate
from cxr.explain import GradCamUnavailable, grad_cam
from cxr.model import BACKBONES, WeightsError, build_backbone, build_model, build_optimizer, weights_digest
from cxr.task import Task

BINARY = Task.of(["NORMAL", "PNEUMONIA"], multilabel=False)

# the model config group's files, one per backbone (conf/model/<name>.yaml), as they are on disk
LISTED = sorted(path.stem for path in (Path(CONF_DIR) / "model").glob("*.yaml"))
# feature vector of each backbone with its config's pooling at 32 px: flatten keeps the
# C x h x w map (32 px is 1 x 1 after the 32x downsampling), vit reads its 768-wide class token
FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "densenet121": 1024,
            "efficientnet_b0": 1280, "efficientnet_v2_s": 1280, "convnext_tiny": 768,
            "regnet_y_1_6gf": 888, "vit_b_16": 768, "swin_t": 768}


def test_each_model_config_file_is_a_registered_backbone_and_each_backbone_has_one(make_cfg):
    """conf/model/'s files against cxr.model.BACKBONES and the hand-made feature table: a backbone
    added to one and not the others, or a file naming another backbone than its own, fails."""
    assert set(LISTED) == set(BACKBONES) == set(FEATURES)
    assert [make_cfg(f"model={name}").model.backbone for name in LISTED] == LISTED


@pytest.mark.parametrize("name", LISTED)
def test_each_backbone_builds_and_gives_logits(make_cfg, name):
    cfg = make_cfg(f"model={name}", "model.weights=null", "data.image_size=32")
    validate(cfg)
    assert cfg.model.backbone == name and cfg.model.dense == 8  # the seed's head on every backbone
    model = build_model(cfg.model, 32, num_classes=3)
    assert model.head[0].in_features == FEATURES[name]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_flatten_keeps_the_spatial_map_where_there_is_one(make_cfg):
    # densenet121 at 64 px: 1024 channels on a 2 x 2 map; avg pools them to 1024
    for pooling, features in (("flatten", 1024 * 2 * 2), ("avg", 1024)):
        cfg = make_cfg("model=densenet121", "model.weights=null", f"model.pooling={pooling}")
        assert build_model(cfg.model, 64, num_classes=2).head[0].in_features == features


@pytest.mark.parametrize(("overrides", "message"), [
    (("model.backbone=resnet500",), r"model.backbone must be one of resnet18\|resnet34\|.*got resnet500"),
    (("model=vit_b_16", "model.pooling=flatten"), r"model.pooling must be token for vit_b_16"),
    (("model=resnet18", "model.pooling=token"), r"model.pooling must be flatten\|avg for resnet18"),
    (("model=vit_b_16", "data.image_size=40"), r"multiple of 16 for vit_b_16"),
    (("model.trainable_stages=-1",), r"model.trainable_stages must be null or >= 0"),
    # the embedded dataset freezes the backbone: asking to train part of it must say so
    (("model.trainable_stages=2",), r"trainable_stages=2 trains part of the backbone: pass model.freeze_backbone"),
    (("optimizer.backbone_lr_scale=0.1",), r"backbone_lr_scale=0.1 .* pass model.freeze_backbone=false"),
])
def test_impossible_choices_are_one_line_errors(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(make_cfg(*overrides))
    assert "\n" not in str(error.value)


def test_a_state_dict_file_loads_into_any_backbone(make_cfg, tmp_path):
    torch.manual_seed(1)
    source = build_backbone("densenet121", None, "avg", 32)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    cfg = make_cfg("model=densenet121", f"model.weights={tmp_path / 'w.pt'}", "model.pooling=avg")
    assert weights_digest(build_model(cfg.model, 32, 2).backbone) == weights_digest(source)
    # flatten rebuilds DenseNet without its pooling: the same parameter names, the same weights
    cfg.model.pooling = "flatten"
    loaded = build_model(cfg.model, 32, 2).backbone
    assert torch.equal(loaded.features.conv0.weight, source.features.conv0.weight)
    torch.save(build_backbone("resnet18", None, "avg", 32).state_dict(), tmp_path / "r.pt")
    cfg.model.weights = str(tmp_path / "r.pt")
    with pytest.raises(WeightsError, match="is not a densenet121 state dict"):
        build_model(cfg.model, 32, 2)


def test_imagenet_weights_offline_name_the_backbones_file(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens: fails at once
    cfg = make_cfg("model=efficientnet_b0", "model.weights=imagenet")
    with pytest.raises(WeightsError, match=r"efficientnet_b0 are not in torch's cache .*efficientnet_b0_rwightman"):
        build_model(cfg.model, 32, 2)


@pytest.mark.parametrize(("name", "size", "side"), [
    ("resnet50", 224, 7),  # layer4 is 224 / 32 = 7 on a side: fine enough
    ("resnet50", 64, 8),  # layer4 would be 2 x 2, layer3 4 x 4: layer2's 64 / 8 = 8 instead
    ("swin_t", 64, 8),  # (B, H, W, C) stages: its second stage, 64 / 8
    ("efficientnet_b0", 64, 8),
])
def test_grad_cam_uses_the_last_stage_fine_enough_to_show_something(make_cfg, name, size, side):
    cfg = make_cfg(f"model={name}", "model.weights=null")
    model = build_model(cfg.model, size, 2)
    cams, logits = grad_cam(model, BINARY, torch.randn(2, 3, size, size), target=1)
    assert cams.shape == (2, side, side) and logits.shape == (2, 2)
    assert cams.amax() <= 1 and cams.amin() >= 0


def test_grad_cam_says_why_a_vit_has_none(make_cfg):
    model = build_model(make_cfg("model=vit_b_16", "model.weights=null").model, 32, 2)
    with pytest.raises(GradCamUnavailable, match="patch embedding"):
        grad_cam(model, BINARY, torch.zeros(1, 3, 32, 32), target=1)


def test_trainable_stages_unfreeze_the_last_stages_only(make_cfg):
    cfg = make_cfg("model=resnet18", "model.weights=null", "model.freeze_backbone=false",
                   "model.trainable_stages=1")
    model = build_model(cfg.model, 32, 2)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.backbone.named_parameters() if n.startswith("layer4.")}
    # convnext's last stage and the LayerNorm after it
    cfg = make_cfg("model=convnext_tiny", "model.weights=null", "model.freeze_backbone=false",
                   "model.trainable_stages=1")
    model = build_model(cfg.model, 32, 2)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.backbone.named_parameters()
                 if p.requires_grad}
    assert trainable == {"features.7", "classifier.0"}


def test_optimizer_groups_carry_the_head_and_backbone_rates(make_cfg):
    cfg = make_cfg("model=resnet18", "model.weights=null", "model.freeze_backbone=false",
                   "optimizer.lr=1e-3", "optimizer.backbone_lr_scale=0.1")
    model = build_model(cfg.model, 32, 2)
    optimizer = build_optimizer(model, cfg.optimizer)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert sum(p.numel() for p in groups["backbone"]["params"]) == 11_176_512  # ResNet18 without fc
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("override", ["optimizer.backbone_lr_scale=0", "model.trainable_stages=0"])
def test_zero_backbone_rate_or_stages_is_the_frozen_backbone(make_cfg, override):
    cfg = effective(make_cfg("debug=smoke", override))
    assert cfg.model.freeze_backbone is True
    model = build_model(cfg.model, 32, 2)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert isinstance(build_optimizer(model.top(), cfg.optimizer), torch.optim.Adam)
    assert not isinstance(model.backbone, nn.Sequential)


@pytest.mark.slow
def test_six_backbone_sweep_then_predict_and_grad_cam_on_each(tmp_path, embedded_root):
    """The issue's acceptance: a smoke sweep over six families, each best.pt predicted with
    Grad-CAM overlays (vit: refused in one line, predictions without them)."""
    import csv
    import subprocess
    import sys

    from cxr.predict import main as predict
    from tests.conftest import REPO

    names = ("resnet18", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_b_16")
    sweep = tmp_path / "sweep"
    # frozen, one epoch: what differs between families is building, saving and explaining them
    done = subprocess.run([sys.executable, "-m", "cxr.train", "-m", f"model={','.join(names)}", "debug=smoke",
                           "model.freeze_backbone=true", "trainer.epochs=1", "trainer.bootstrap=0",
                           f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert [row["status"] for row in rows] == ["ok"] * 6
    images = embedded_root / "test" / "NORMAL"
    for name in names:
        best = next(sweep.glob(f"*,model={name},*")) / "best.pt"  # 0_model.freeze_backbone=True,model=resnet18,...
        cams = tmp_path / f"cams-{name}"
        args = [f"checkpoint={best}", f"inputs={images}", f"output={tmp_path / name}.csv"]
        if name == "vit_b_16":
            assert predict([*args, f"gradcam={cams}"]) == 1 and not cams.exists()
            assert predict(args) == 0
        else:
            assert predict([*args, f"gradcam={cams}"]) == 0
            assert len(list(cams.glob("*.png"))) == len(list(images.iterdir()))

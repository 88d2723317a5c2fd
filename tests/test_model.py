import pytest
import torch
from torch import nn

from cxr.model import WeightsError, build_model, build_optimizer, feature_count


def linear_shapes(head: nn.Sequential):
    return [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]


def test_seed_head_two_hidden_layers_of_16(make_cfg):
    cfg = make_cfg("model.dense=16", "model.hidden_layers=2", "optimizer.lr=5e-5", "data.image_size=64")
    model = build_model(cfg.model, cfg.data.image_size, num_classes=2)
    flat = 2048 * 2 * 2  # Keras Flatten of the 2048 x 2 x 2 map at 64 px
    assert linear_shapes(model.head) == [(flat, 16), (16, 16), (16, 2)]
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.head) == 2
    head_params = (flat * 16 + 16) + (16 * 16 + 16) + (16 * 2 + 2)
    assert sum(p.numel() for p in model.head.parameters()) == head_params
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_508_032  # ResNet50 without fc
    optimizer = build_optimizer(model, cfg.optimizer)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 5e-5


@pytest.mark.parametrize(("pooling", "size", "features"),
                         [("flatten", 224, 100_352), ("flatten", 64, 8192), ("avg", 224, 2048),
                          ("flatten", 200, 100_352)])
def test_feature_count_matches_the_backbone(make_cfg, pooling, size, features):
    cfg = make_cfg(f"model.pooling={pooling}", f"data.image_size={size}")
    model = build_model(cfg.model, size, num_classes=2).eval()
    assert feature_count(model.backbone, size) == features
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, 3, size, size)).shape == (1, features)


def test_freeze_backbone_trains_the_head_only(make_cfg):
    cfg = make_cfg("model.freeze_backbone=true", "data.image_size=64")
    model = build_model(cfg.model, 64, num_classes=2)
    optimizer = build_optimizer(model, cfg.optimizer)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.head.parameters()}


def test_weights_from_a_state_dict_file(make_cfg, tmp_path):
    cfg = make_cfg("data.image_size=64")
    source = build_model(cfg.model, 64, num_classes=2)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    cfg.model.weights = str(path)
    loaded = build_model(cfg.model, 64, num_classes=2)
    assert torch.equal(loaded.backbone.conv1.weight, source.backbone.conv1.weight)


def test_missing_weights_file_is_one_clear_error(make_cfg, tmp_path):
    cfg = make_cfg(f"model.weights={tmp_path}/nope.pt")
    with pytest.raises(WeightsError, match="nope.pt"):
        build_model(cfg.model, 64, num_classes=2)


def test_imagenet_weights_offline_say_where_torch_looks(make_cfg, tmp_path, monkeypatch):
    # an empty torch hub dir and no network: the message names the cache path and the way out
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens: fails at once
    cfg = make_cfg()
    cfg.model.weights = "imagenet"
    with pytest.raises(WeightsError, match=r"checkpoints.*model.weights=null"):
        build_model(cfg.model, 64, num_classes=2)


@pytest.mark.slow
def test_item1_frozen_stages_keep_their_batchnorm_statistics(make_cfg, tmp_path):
    """model.trainable_stages=1: a real run trains layer4 (and what follows) only. The BatchNorm
    running statistics of the stem and layer1-3 in best.pt are those of a freshly built model of
    the same seed, bit for bit (they run in eval mode, as Keras' trainable=False BatchNorm does);
    layer4's moved."""
    from cxr.train import run

    cfg = make_cfg("debug=smoke", "model.trainable_stages=1", "trainer.epochs=1", "trainer.bootstrap=0",
                   "trainer.tensorboard_images=false")
    run(cfg, tmp_path)
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    fresh = build_model(cfg.model, cfg.data.image_size, num_classes=2, init_seed=cfg.seed).state_dict()
    statistics = [key for key in fresh if key.rpartition(".")[2] in ("running_mean", "running_var",
                                                                      "num_batches_tracked")]
    frozen = [key for key in statistics if not key.startswith("backbone.layer4.")]
    assert len(frozen) == 3 * (1 + 3 * 3 + 4 * 3 + 6 * 3 + 3)  # the stem, layer1-3's blocks and downsamples
    moved = [key for key in frozen if not torch.equal(best[key], fresh[key])]
    assert moved == []
    assert not torch.equal(best["backbone.layer4.0.bn1.running_mean"], fresh["backbone.layer4.0.bn1.running_mean"])


def test_item1_train_mode_leaves_frozen_parts_in_eval(make_cfg):
    cfg = make_cfg("model.freeze_backbone=false", "model.trainable_stages=2", "data.image_size=32")
    model = build_model(cfg.model, 32, num_classes=2).train()
    frozen = [model.backbone.bn1, model.backbone.layer1, model.backbone.layer2]
    assert not any(module.training for part in frozen for module in part.modules())
    assert all(module.training for part in (model.backbone.layer3, model.head) for module in part.modules())
    assert not any(module.training for module in model.eval().modules())

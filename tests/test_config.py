import pytest
from hydra.errors import ConfigCompositionException

from cxr.config import ConfigError, validate


def test_defaults_compose_to_the_embedded_dataset(make_cfg):
    cfg = make_cfg()
    assert cfg.data.name == "synthetic"
    assert cfg.model.weights is None  # offline: the embedded data trains from scratch
    assert (cfg.model.dense, cfg.model.hidden_layers, cfg.model.dropout) == (8, 1, 0.5)
    assert cfg.model.pooling == "flatten"
    assert cfg.optimizer.name == "adam"


def test_real_data_defaults_follow_the_seed(make_cfg):
    cfg = make_cfg("data=chest_xray", "data.root=/somewhere")
    assert cfg.data.image_size == 224
    assert cfg.model.weights == "imagenet"
    assert cfg.optimizer.lr == 1e-5
    assert cfg.trainer.epochs == 20


@pytest.mark.parametrize("override", ["model.dens=8", "model.dense=abc", "optimizer.lr=fast"])
def test_typos_and_wrong_types_fail_at_compose_time(make_cfg, override):
    with pytest.raises(ConfigCompositionException):
        make_cfg(override)


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.dense=0", "model.dense"), ("model.hidden_layers=-1", "model.hidden_layers"),
     ("optimizer.lr=0", "optimizer.lr"), ("model.dropout=1.0", "model.dropout"),
     ("model.dropout=-0.1", "model.dropout"), ("data.image_size=16", "data.image_size"),
     ("trainer.threshold=1.5", "trainer.threshold"), ("model.pooling=max", "model.pooling")],
)
def test_values_out_of_range_are_rejected_naming_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        validate(make_cfg(override))


def test_optimizer_group_switches_the_optimizer(make_cfg):
    cfg = make_cfg("optimizer=sgd")
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.momentum == 0.9

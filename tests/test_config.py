import importlib
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from cxr.config import CONF_DIR, ConfigError, validate
from cxr.model import build_optimizer
from cxr.schedule import build_scheduler, scheduled_lr


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


# ---------------------------------------------------------------------------------------------
# One table per option set: what validation accepts is exactly what construction builds


@pytest.mark.parametrize(("override", "key", "table"), [
    ("optimizer.name=adamx", "optimizer.name", "cxr.model.OPTIMIZERS"),
    ("scheduler.name=linear", "scheduler.name", "cxr.schedule.SCHEDULES"),
    ("data.augment=heavy", "data.augment", "cxr.batches.AUGMENT"),
    ("trainer.monitor=val/f1", "trainer.monitor", "cxr.engine.MONITORS"),
])
def test_an_unknown_option_is_one_line_listing_what_construction_knows(make_cfg, override, key, table):
    module, name = table.rsplit(".", 1)
    known = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as error:
        validate(make_cfg(override))
    message = str(error.value)
    assert message.startswith(f"{key} must be") and "\n" not in message
    assert all(option in message for option in known)


@pytest.mark.parametrize("group", sorted(p.stem for p in (Path(CONF_DIR) / "optimizer").glob("*.yaml")))
def test_every_optimizer_file_builds_its_own_optimizer(make_cfg, group):
    cfg = make_cfg(f"optimizer={group}")
    validate(cfg)
    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg.optimizer)
    assert type(optimizer).__name__.lower() == cfg.optimizer.name  # Adam, AdamW, SGD: no fallback


@pytest.mark.parametrize("group", sorted(p.stem for p in (Path(CONF_DIR) / "scheduler").glob("*.yaml")))
def test_every_scheduler_file_is_a_schedule(make_cfg, group):
    cfg = make_cfg(f"scheduler={group}")
    validate(cfg)
    optimizer = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, cfg.scheduler, steps_per_epoch=10, epochs=20)
    rates = [scheduled_lr(scheduler, step) for step in range(200)]
    # none stays at 1; cosine and step fall, each its own way
    assert (rates[-1] == 1.0) == (group == "none")
    assert (len(set(rates)) <= 3) == (group in ("none", "step"))

"""The fine-tuning recipe: schedules, early stopping, frozen-by-rate backbones, augmentation,
gradient accumulation. Real tiny runs on CPU, read back from the files they wrote; expected
numbers are worked out by hand."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cxr.batches import Augment, Strength
from cxr.checkpoint import load_checkpoint, load_classifier
from cxr.engine import train_one_epoch
from cxr.model import build_model, weights_digest
from cxr.schedule import lr_factor
from cxr.task import Task
from cxr.train import run

# resnet18 trained whole, augmented, on a warmup + cosine schedule: 64 training images in
# batches of 16 are 4 optimizer steps an epoch, 12 in the run; one thread, bit-for-bit repeatable
RECIPE = ("debug=smoke", "model=resnet18", "model.weights=null", "data.augment=light",
          "scheduler=cosine", "scheduler.warmup_steps=3", "trainer.epochs=3", "trainer.deterministic=true",
          "trainer.bootstrap=0", "trainer.tensorboard_images=false")
# the light preset on a CPU, from a fixed seed
AUGMENT_LIGHT = Augment("light", hflip=False, seed=0, device=torch.device("cpu"))
# lr / 1e-4 at steps 1..12: warmup 1/4, 2/4, 3/4, then 0.5 (1 + cos(pi k / 9)) for k = 0..8
FACTORS = (0.25, 0.5, 0.75, 1.0, 0.9698463, 0.8830222, 0.75, 0.5868241, 0.4131759, 0.25, 0.1169778,
           0.0301537)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, make_cfg, one_thread):
    out = tmp_path_factory.mktemp("recipe")
    run(make_cfg(*RECIPE), out)
    return out


def read_result(run_dir) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def test_warmup_and_cosine_factors_by_hand():
    factor = [lr_factor(s, name="cosine", warmup_steps=3, total_steps=12, steps_per_epoch=4,
                        min_lr_scale=0.0, step_epochs=1, gamma=1.0) for s in range(12)]
    assert factor == pytest.approx(FACTORS, abs=1e-7)
    # step: x0.5 every 2 epochs of 4 steps, after a 2-step warmup of 1/3, 2/3
    step = [lr_factor(s, name="step", warmup_steps=2, total_steps=24, steps_per_epoch=4, min_lr_scale=0.0,
                      step_epochs=2, gamma=0.5) for s in (0, 1, 2, 7, 8, 15, 16)]
    assert step == pytest.approx([1 / 3, 2 / 3, 1, 1, 0.5, 0.5, 0.25])


def test_tensorboard_lr_follows_warmup_then_cosine(recipe_run):
    events = EventAccumulator(str(recipe_run), size_guidance={"scalars": 0})
    events.Reload()
    lrs = events.Scalars("train/lr")
    assert [e.step for e in lrs] == list(range(1, 13))
    assert [e.value for e in lrs] == pytest.approx([1e-4 * f for f in FACTORS], rel=1e-5)
    assert read_result(recipe_run)["scheduler"] == {"name": "cosine", "warmup_steps": 3, "min_lr_scale": 0.0,
                                                    "step_epochs": 10, "gamma": 0.1}


def test_resumed_mid_schedule_ends_identical(recipe_run, make_cfg, tmp_path, monkeypatch):
    """Killed in epoch 2 after last.pt of epoch 1: the resumed run matches the uninterrupted one."""
    from cxr.tensorboard import RunBoard

    class Killed(Exception):
        pass

    def die_in_epoch_2(self, row):
        if row["epoch"] == 2:
            raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(RunBoard, "epoch", die_in_epoch_2)
        with pytest.raises(Killed):
            run(make_cfg(*RECIPE), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["scheduler"]["last_epoch"] == 4  # one epoch's steps
    run(make_cfg(*RECIPE, "trainer.resume=true"), tmp_path)
    resumed, expected = read_result(tmp_path), read_result(recipe_run)
    assert resumed["history"] == expected["history"] and resumed["metrics"] == expected["metrics"]
    weights = [load_checkpoint(d / "best.pt")["model"] for d in (tmp_path, recipe_run)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()  # the lrs of every step, once, also those of the epoch before the resumption
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-4 * f for f in FACTORS], rel=1e-5)


def test_patience_stops_when_the_monitor_cannot_improve(make_cfg, tmp_path):
    # an lr far below float32's resolution of the head's weights: nothing changes, AUROC neither
    cfg = make_cfg("debug=smoke", "model.freeze_backbone=true", "optimizer.lr=1e-12", "trainer.epochs=5",
                   "trainer.patience=1", "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    run(cfg, tmp_path)
    result = read_result(tmp_path)
    assert result["status"] == "ok" and result["stopped_epoch"] == 2 and result["best_epoch"] == 1
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert result["history"][0]["val/auroc"] == result["history"][1]["val/auroc"]


def test_backbone_lr_scale_zero_trains_only_the_head(make_cfg, tmp_path):
    cfg = make_cfg("debug=smoke", "model=resnet18", "model.weights=null", "optimizer.backbone_lr_scale=0",
                   "trainer.bootstrap=0", "trainer.tensorboard_images=false")
    run(cfg, tmp_path)
    result = read_result(tmp_path)
    assert result["model"]["freeze_backbone"] is True  # the frozen path, as the config states
    trained, _, _ = load_classifier(tmp_path / "best.pt", torch.device("cpu"))
    untouched = build_model(cfg.model, 32, 2, init_seed=cfg.seed)
    assert weights_digest(trained.backbone) == weights_digest(untouched.backbone)
    assert not torch.equal(trained.head[0].weight, untouched.head[0].weight)


def sgd_after_one_epoch(batches, accumulate_steps: int) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_one_epoch(model, optimizer, batches, Task.of(["NORMAL", "PNEUMONIA"], multilabel=False),
                    device=torch.device("cpu"), epoch=1, total=len(batches),
                    progress=False, accumulate_steps=accumulate_steps)
    return model


def test_accumulating_two_batches_steps_as_one_batch_of_both():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=generator), torch.randint(0, 2, (12,), generator=generator)
    # batches of 4, 4 | 2, 2 accumulated by two, against batches of 8 | 4: the same two steps
    # (the short last group is averaged over its own batches)
    small = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:10], y[8:10]), (x[10:], y[10:])]
    large = [(x[:8], y[:8]), (x[8:], y[8:])]
    accumulated, plain = sgd_after_one_epoch(small, 2), sgd_after_one_epoch(large, 1)
    assert torch.allclose(accumulated.weight, plain.weight, atol=1e-6)
    assert torch.allclose(accumulated.bias, plain.bias, atol=1e-6)
    assert not torch.allclose(sgd_after_one_epoch(small, 1).weight, plain.weight, atol=1e-4)
    odd = small[:3]  # 4, 4 | 2: the last group is one batch, a step of its own
    assert torch.allclose(sgd_after_one_epoch(odd, 2).weight,
                          sgd_after_one_epoch([large[0], (x[8:10], y[8:10])], 1).weight, atol=1e-6)


def test_augmentation_is_deterministic_under_its_seed():
    images = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16) % 255
    cpu = torch.device("cpu")
    first = Augment("strong", False, seed=3, device=cpu)(images)
    assert torch.equal(first, Augment("strong", False, seed=3, device=cpu)(images))
    assert not torch.equal(first, Augment("strong", False, seed=4, device=cpu)(images))
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 255


def spot_centres(images: torch.Tensor) -> torch.Tensor:
    """The (x, y) centre of the bright spot in each half (left, right) of each image: (B, 2, 2)."""
    rows, columns = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centres = []
    for half in (slice(0, 32), slice(32, 64)):
        part = images[:, 0, :, half]
        low, high = part.amin(dim=(1, 2), keepdim=True), part.amax(dim=(1, 2), keepdim=True)
        weight = (part - (low + high) / 2).clamp(min=0)  # the spot's upper half: intensity changes cancel
        total = weight.sum(dim=(1, 2))
        centres.append(torch.stack([(weight * columns[:, half]).sum(dim=(1, 2)) / total,
                                    (weight * rows[:, half]).sum(dim=(1, 2)) / total], dim=1))
    return torch.stack(centres, dim=1)


def test_light_augmentation_shifts_zooms_and_rotates_within_its_ranges():
    """Two bright spots on a horizontal line through the centre of a 64 px image, augmented 512
    times with the light preset, and the affine transform measured back from where the spots
    went: zoom from their distance, rotation from their direction, shift from their midpoint. The
    image samples its source at zoom x R(angle) x (its coordinates) + shift, so each draw must
    have a zoom in 1 +- 0.08, an angle within +-5 degrees and a shift within +-6% of the side
    (3.84 px) per axis (the strong preset's are 0.15, 10 and 10%); over 512 draws each range is
    nearly filled."""
    rows, columns = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    spot = lambda x: torch.exp(-((columns - x) ** 2 + (rows - 31.5) ** 2) / 8)  # noqa: E731
    image = 40 + 200 * (spot(15.5) + spot(47.5))
    before = spot_centres(image[None, None])[0]
    after = spot_centres(AUGMENT_LIGHT(image.expand(512, 1, 64, 64).clone()))
    between = after[:, 1] - after[:, 0]
    zoom = (before[1] - before[0]).norm() / between.norm(dim=1)
    angle = -torch.atan2(between[:, 1], between[:, 0])
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
    # the source's centre shows at the midpoint: 0 = zoom x R x midpoint + shift
    shift = -zoom[:, None] * (rotation @ (after.mean(dim=1) - 31.5)[:, :, None])[:, :, 0]
    # (what is measured, its bound, the measurement's error: spot centres are good to ~0.2 px)
    for measured, bound, error in ((zoom - 1, 0.08, 0.01), (angle.rad2deg(), 5.0, 0.5), (shift, 3.84, 0.3)):
        extreme = measured.abs().amax(dim=0)
        assert (extreme <= bound + error).all() and (extreme > 0.9 * bound - error).all(), (extreme, bound)


def test_horizontal_flip_mirrors_and_only_when_asked():
    images = torch.rand(16, 1, 8, 8) * 255
    still = Strength(rotate_degrees=0, shift=0, scale=0, brightness=0, contrast=0, gamma=0)
    for hflip in (False, True):
        augment = Augment("light", hflip, seed=0, device=torch.device("cpu"))
        augment.strength = still  # no rotation, shift, zoom or intensity change: the mirror alone
        out = augment(images)
        mirrored = [torch.allclose(o, i.flip(-1), atol=1e-3) for o, i in zip(out, images, strict=True)]
        kept = [torch.allclose(o, i, atol=1e-3) for o, i in zip(out, images, strict=True)]
        assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # one or the other
        assert any(mirrored) == hflip


def test_report_names_the_backbone_and_where_runs_stopped(tmp_path):
    from cxr.aggregate import aggregate

    for number, (backbone, stopped) in enumerate((("resnet18", 3), ("densenet121", None))):
        job = tmp_path / f"{number}_model={backbone}"
        job.mkdir()
        (job / "result.json").write_text(json.dumps({
            "status": "ok", "overrides": [f"model={backbone}"], "model": {"backbone": backbone},
            "metrics": {"test/acc": 0.5, "val/auroc": 0.5}, "epochs": 5, "best_epoch": 1,
            "stopped_epoch": stopped}))
    aggregate(tmp_path)
    header, _, first, second = (tmp_path / "results.md").read_text().splitlines()[2:6]
    assert "Stopped At" in header
    assert first.startswith("| resnet18 ") and second.startswith("| densenet121 ")
    cells = [[c.strip() for c in line.split("|")] for line in (header, first, second)]
    column = cells[0].index("Stopped At")
    assert (cells[1][column], cells[2][column]) == ("3", "—")

"""Grad-CAM: where in the X-ray the network found evidence for a class.

One implementation for both users: `python -m cxr.predict ... gradcam=DIR` writes an overlay PNG
per image at the image's own size, and training logs overlays of a few test images to
TensorBoard (cxr.tensorboard.RunBoard.gradcam).
"""

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr.model import FAMILIES, Classifier
from cxr.pixels import read_picture
from cxr.task import Task


class GradCamUnavailable(Exception):
    """The backbone has no convolutional feature map to explain (one line saying why)."""


# a map coarser than this (at the run's image size) shows a few blobs over the whole chest: the
# side of ResNet50's last map at the 224 px Grad-CAM was shown on; at 64 px ResNet50's layer4 is
# 2 x 2 and layer3 4 x 4, so layer2's 8 x 8 is used (on a toy set of one-cell lesions layer3's
# peak missed the cell occlusion picked in 4 of 16 images of a frozen backbone, layer2's in none)
MIN_SIDE = 7


def check_grad_cam(model: Classifier) -> None:
    """Raise GradCamUnavailable, saying why, when the backbone has no convolutional map."""
    reason = FAMILIES[model.family].no_grad_cam
    if reason:
        raise GradCamUnavailable(f"Grad-CAM needs a convolutional feature map, and a {model.family} "
                                 f"backbone has none: {reason}")


def grad_cam(model: Classifier, task: Task, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B, h, w) in [0, 1] for output `target`, and the logits (B, C).

    The channels of a convolutional stage are weighted by the mean gradient of the target's
    log-odds (`Task.log_odds`) over its map (Selvaraju et al. 2017, who take the class logit);
    only positive evidence is kept, scaled to a peak of 1 per image. The stage is the backbone's
    last one, or the last one whose map is at least MIN_SIDE on a side (see `cam_stage`). The
    model is put in eval mode: BatchNorm on its running statistics, so images in a batch do not
    influence each other and one backward pass serves them all.
    """
    check_grad_cam(model)
    family = FAMILIES[model.family]
    model.eval()
    modules = dict(model.backbone.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, out)) for name in model.stages()]
    try:
        with torch.enable_grad():
            # an input that needs grad keeps the stages in the graph even with a frozen backbone
            logits = model(x.detach().requires_grad_())
            name = cam_stage({name: out.shape for name, out in captured.items()}, family.channels_last_maps)
            (grads,) = torch.autograd.grad(task.log_odds(logits, target).sum(), captured[name])
    finally:
        for handle in handles:
            handle.remove()
    chosen = captured[name].detach()
    if family.channels_last_maps:  # (B, H, W, C) -> (B, C, H, W)
        chosen, grads = chosen.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
    if model.feature_norm.standardises():
        # The head reads standardised features: a feature's "no evidence" is its training mean,
        # not 0. Frozen random-init features sit far from 0 and vary little (std/mean ~0.3 on
        # real radiographs), so the channels' offsets outweighed the rest: the maps of 39 of the 40
        # surest PNEUMONIA test images of cxr-real were negative everywhere, i.e. blank. An offset
        # shared by every location cannot say where the evidence is: each channel is taken from
        # its mean over the map.
        chosen = chosen - chosen.mean(dim=(2, 3), keepdim=True)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * chosen).sum(dim=1))
    return cams / cams.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12), logits.detach()


def cam_stage(shapes: dict[str, torch.Size], channels_last_maps: bool) -> str:
    """The last stage (in forward order) whose map is at least MIN_SIDE on both sides; where
    every map is coarser, the finest (first) one."""
    sides = {name: min(shape[1:3] if channels_last_maps else shape[-2:]) for name, shape in shapes.items()}
    fine = [name for name, side in sides.items() if side >= MIN_SIDE]
    return fine[-1] if fine else next(iter(sides))


def overlay(image: np.ndarray, cam: torch.Tensor, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 (H, W, 3): the grayscale image (H, W) under the map, in matplotlib's jet.

    The network saw the whole image squashed to a square, so the map stretched back to (H, W)
    lines up with the image whatever its aspect ratio.
    """
    height, width = image.shape
    cam = F.interpolate(cam[None, None].float().cpu(), size=(height, width), mode="bilinear",
                        align_corners=False)[0, 0].clamp(0, 1).numpy()
    heat = matplotlib.colormaps["jet"](cam, bytes=True)[..., :3].astype(np.float32)
    blended = (1 - alpha) * image[..., None].astype(np.float32) + alpha * heat
    return blended.round().astype(np.uint8)


def save_overlay(path: str, cam: torch.Tensor, destination, window: str) -> None:
    """Overlay `cam` on the picture of the image file at `path` (under data.window, as the network
    saw it: a DICOM windowed, a 16-bit PNG scaled), at its original size, as a PNG."""
    original = read_picture(path, window)
    # zlib level 1: several times faster than the default on multi-megapixel overlays
    Image.fromarray(overlay(original, cam)).save(destination, compress_level=1)

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

from cxr.model import Classifier


def grad_cam(model: Classifier, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B, h, w) in [0, 1] for class `target`, and the logits (B, C).

    The channels of the last convolutional stage (backbone.layer4) are weighted by the mean
    gradient of the target logit over the map (Selvaraju et al. 2017); only positive evidence is
    kept, scaled to a peak of 1 per image. The model is put in eval mode: BatchNorm on its
    running statistics, so images in a batch do not influence each other and one backward pass
    serves them all.
    """
    model.eval()
    captured = []
    handle = model.backbone.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            # an input that needs grad keeps layer4 in the graph even with a frozen backbone
            logits = model(x.detach().requires_grad_())
            (grads,) = torch.autograd.grad(logits[:, target].sum(), captured[0])
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * captured[0].detach()).sum(dim=1))
    return cams / cams.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12), logits.detach()


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


def save_overlay(path: str, cam: torch.Tensor, destination) -> None:
    """Overlay `cam` on the image file at `path`, at its original size, as a PNG."""
    with Image.open(path) as image:
        original = np.asarray(image.convert("L"))
    # zlib level 1: several times faster than the default on multi-megapixel overlays
    Image.fromarray(overlay(original, cam)).save(destination, compress_level=1)

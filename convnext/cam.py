"""Class activation maps: Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhyay et al. 2018) on the last
stage's output, the map `forward_features` returns.

Grad-CAM weighs each channel of that map by the mean gradient of the class score over the map, sums the channels
and keeps the positive part; Grad-CAM++ weighs the positive gradients pixel by pixel instead (its closed form for
an exponential score, as pytorch-grad-cam computes it). Any model with `forward_features` (B, C, h, w) and
`forward_head` works: every ConvNeXt of this library, whatever its weights came from. An exported model (ONNX) has
no such map and is refused by `check_cam_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from convnext.features import check_writable

METHODS = ("gradcam", "gradcam++")


def check_cam_model(model: nn.Module, name: str = "the model", flag: str = "--cam") -> None:
    """Raise ValueError naming `flag` unless `model` gives the spatial map a CAM (and the pooled features) need:
    `forward_features` and `forward_head`."""
    missing = [m for m in ("forward_features", "forward_head") if not callable(getattr(model, m, None))]
    if missing:
        raise ValueError(f"{flag}: {name} has no spatial feature maps (no {' / '.join(missing)}; an exported model "
                         "such as ONNX has none): give the checkpoint, run folder or name it came from")  # fmt: skip


def grad_cam(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None, method: str = "gradcam"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class activation maps of a preprocessed batch x (B, 3, H, W) for `classes` (B,) (default: each image's
    top class): (maps (B, H, W) in [0, 1], upsampled bilinearly to the input, the classes used (B,)).

    The model's parameters get no gradients; it runs in eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"CAM method must be one of {METHODS}, not {method!r}")
    model.eval()
    with torch.enable_grad():
        fmap = model.forward_features(x.detach()).float()  # (B, C, h, w)
        if fmap.ndim != 4:
            raise ValueError(f"forward_features gave shape {tuple(fmap.shape)}, not a (B, C, h, w) map")
        if fmap.shape[-2:].numel() == 1:  # pooling a single position: the map is one value, nothing to localise
            raise ValueError(f"--cam: the last stage's map is 1x1 for {x.shape[-1]} px input; a larger --img-size "
                             "gives it positions to compare")  # fmt: skip
        fmap = fmap.detach().requires_grad_(True)
        logits = model.forward_head(fmap)  # (B, K)
        if classes is None:
            classes = logits.argmax(dim=1)
        classes = classes.to(logits.device)
        (grads,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), fmap)
    weights = _weights(fmap.detach(), grads, method)  # (B, C)
    cam = F.relu((weights[:, :, None, None] * fmap.detach()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return cam / peak[:, None, None], classes


def _weights(fmap: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """Channel weights (B, C): the spatial mean gradient (Grad-CAM) or the alpha-weighted positive gradients
    (Grad-CAM++)."""
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + fmap.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
    return (alpha * F.relu(grads)).sum(dim=(2, 3))


def to_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised input (3, H, W) back to the picture the model saw: uint8 (H, W, 3)."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    rgb = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, cam: torch.Tensor, alpha: float = 0.5, min_side: int = 224) -> Image.Image:
    """The map (H, W) in [0, 1] as a jet heat map over the picture (H, W, 3), upscaled to at least `min_side`."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam.detach().float().cpu().numpy())[..., :3]  # (H, W, 3) in [0, 1]
    mixed = (1 - alpha) * image.astype(np.float32) / 255 + alpha * heat
    out = Image.fromarray((mixed.clip(0, 1) * 255).round().astype(np.uint8))
    scale = max(1, -(-min_side // min(out.size)))
    return out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST) if scale > 1 else out


def save_overlay(path: Path, image: np.ndarray, cam: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, cam).save(path)
    return path


def check_cam_folder(folder: Path, force: bool = False) -> None:
    """`--cam-dir`: a new or empty folder (or any with `force`) whose parent takes files."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--cam-dir: {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ValueError(f"--cam-dir: {folder} is not empty; pass --force to write into it, or name another folder")
    probe = folder if folder.is_dir() else folder.parent
    while not probe.exists() and probe != probe.parent:  # mkdir -p creates the missing folders
        probe = probe.parent
    check_writable([probe / "_"], "--cam-dir")

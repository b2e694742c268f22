"""Effective receptive field (Luo et al. 2016; the measure of RepLKNet, Ding et al. 2022).

The ERF of a model is how much each input pixel moves the central output of its last stage: the gradient of
that output (summed over channels) with respect to the input, absolute, summed over input channels and
averaged over images. `area_shares` turns the map into numbers: the share of the input area, as the smallest
centred square, that holds 20/30/50/99% of the total contribution (RepLKNet's "area ratio").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from convnext.constants import IMAGENET_MEAN, IMAGENET_STD

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def load_images(
    folder: str | Path,
    img_size: int,
    limit: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Up to `limit` images under `folder` (recursive, evenly spaced in sorted order), as eval input: resized,
    centre-cropped to img_size, normalised with mean/std. Returns (N, 3, img_size, img_size) float32."""
    from convnext.data import eval_transform, load_image
    from convnext.data.decode import find_images
    from convnext.data.transforms import first_resize_side

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: no such folder: {folder}")
    files = find_images(folder)
    files = files[:: max(len(files) // limit, 1)][:limit]  # spread over the list: every class folder, not the first
    tf = eval_transform(img_size, 1.0, mean, std)  # crop_pct 1: the whole short side, centre-cropped square
    return torch.stack([tf(load_image(f, first_resize_side(tf))) for f in files])


def random_images(n: int, img_size: int, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    """(n, in_chans, img_size, img_size) standard-normal images: the ERF of the architecture, without data."""
    return torch.randn(n, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def features_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function whose output is the last stage's map: `forward_features` if the model has one, else the model."""
    return getattr(model, "forward_features", model)


def erf_map(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean over images of |d(central output, summed over channels) / d input|, summed over input channels: (H, W).

    The model runs in eval mode (BatchNorm uses its running statistics); its parameters get no gradients.
    """
    features = features_of(model)
    was_training = model.training
    model.eval()
    total, count = None, 0
    try:
        for x in batches:
            x = x.detach().clone().requires_grad_(True)  # (B, C, H, W)
            y = features(x)  # (B, C', h, w)
            central = y[:, :, y.shape[-2] // 2, y.shape[-1] // 2].sum()
            (grad,) = torch.autograd.grad(central, x)
            contrib = grad.abs().sum(dim=1).sum(dim=0)  # (H, W)
            total = contrib if total is None else total + contrib
            count += x.shape[0]
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("erf_map: no images")
    return total / count


def area_shares(erf: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """For each threshold t: the area share (0..1] of the smallest square centred on (H//2, W//2), clipped to
    the map, whose contribution is at least t of the whole."""
    h, w = erf.shape
    cy, cx = h // 2, w // 2
    erf = erf.double()
    total = erf.sum().item()
    if total <= 0:
        raise ValueError("area_shares: the map is all zero")
    shares, radius = {}, 0
    for t in sorted(thresholds):
        while True:
            rows, cols = slice(max(cy - radius, 0), cy + radius + 1), slice(max(cx - radius, 0), cx + radius + 1)
            square = erf[rows, cols]
            if square.sum().item() >= t * total * (1 - 1e-12) or square.numel() == h * w:
                shares[t] = square.numel() / (h * w)
                break
            radius += 1
    return {t: shares[t] for t in thresholds}


def plot_erfs(maps: dict[str, torch.Tensor], path: str | Path, decades: float = 3.0) -> Path:
    """Save one heatmap per model side by side: contribution relative to its peak, log colour scale over `decades`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    norm = LogNorm(vmin=10**-decades, vmax=1.0)
    for ax, (name, erf) in zip(axes[0], maps.items()):
        rel = (erf / erf.max()).clamp_min(10**-decades).cpu().numpy()
        im = ax.imshow(rel, cmap="RdYlGn", norm=norm)
        shares = area_shares(erf)
        lines = [f"{int(t * 100)}% in {s:.1%}" for t, s in shares.items()]
        ax.set_title(f"{name}\n" + "   ".join(lines[:2]) + "\n" + "   ".join(lines[2:]), fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="contribution / peak")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

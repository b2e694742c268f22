"""The picture a pre-training run draws after every epoch: for a few fixed val images, the image, what the encoder
is shown (removed patches grey), and the reconstruction (visible patches as given, removed ones predicted)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convnext.pretrain.fcmae import FCMAE, upsample_mask


def save_reconstructions(
    model: FCMAE,
    images: torch.Tensor,
    masks: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
) -> Path:
    """Three rows (original, masked, reconstruction) of `images` (normalised (N, C, H, W)) with their `masks`
    (N, h, w), un-normalised with mean/std, enlarged to at least 96 px, as one PNG at `path`."""
    model.eval()
    device = next(model.parameters()).device
    x, masks = images.to(device), masks.to(device)
    with torch.no_grad():
        recon = model.reconstruct(x, masks)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    grey = ((0.5 - m) / s).expand_as(x)  # mid-grey in normalised units, per channel
    shown = torch.where(upsample_mask(masks, x.shape[-2:]), grey, x)
    rows = [x, shown, recon.to(x.dtype)]
    pixels = [((r.float() * s + m).clamp(0, 1) * 255).round().byte().cpu() for r in rows]  # (N, C, H, W) each
    n, c, h, w = pixels[0].shape
    gap = 2
    sheet = torch.full((c, 3 * h + 2 * gap, n * w + (n - 1) * gap), 255, dtype=torch.uint8)
    for i, row in enumerate(pixels):
        for j in range(n):
            sheet[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = row[j]
    image = Image.fromarray(np.ascontiguousarray(sheet.permute(1, 2, 0).numpy()).squeeze())
    scale = max(1, -(-96 // h))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path

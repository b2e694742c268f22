"""Patch-whitening initialisation of the patchify stem, from the training images.

A ConvNeXt stem is a p x p, stride-p convolution over non-overlapping patches: exactly the layer that airbench
(Jordan, "94% on CIFAR-10 in 3.29 seconds") initialises to whiten image patches. The covariance of the
(normalised) training patches has eigenvectors v_i and eigenvalues l_i; filters v_i / sqrt(l_i + eps) map a patch
to decorrelated, unit-variance coordinates. The stem gets the top dims/2 of them and their negatives (so a ReLU-free
stem still sees both signs), and a zero bias; it stays trainable.
"""

from __future__ import annotations

import torch
from torch import nn


def patch_whitening(patches: torch.Tensor, out_channels: int, eps: float = 5e-4) -> torch.Tensor:
    """patches (N, C, p, p) -> whitening filters (out_channels, C, p, p): the top out_channels/2 principal
    directions scaled by 1/sqrt(eigenvalue + eps), each with its negative; more channels than directions x 2 are
    filled with the remaining directions."""
    n, c, p, _ = patches.shape
    flat = patches.reshape(n, -1).double()
    flat = flat - flat.mean(0)
    cov = flat.T @ flat / max(n - 1, 1)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval.flip(0), eigvec.flip(1)
    filters = (eigvec / torch.sqrt(eigval.clamp(min=0) + eps)).T  # (C*p*p, C*p*p), one filter per row
    half = min(out_channels // 2, filters.shape[0])
    rows = torch.cat([filters[:half], -filters[:half]])
    if len(rows) < out_channels:
        extra = filters[half : half + out_channels - len(rows)]
        rows = torch.cat([rows, extra, torch.zeros(out_channels - len(rows) - len(extra), filters.shape[1])])
    return rows.reshape(out_channels, c, p, p).float()


def whiten_stem(stem_conv: nn.Conv2d, images: torch.Tensor, mean, std, samples: int = 10000, seed: int = 0) -> None:
    """Set `stem_conv` (p x p, stride p) to whiten p x p patches of `images` (uint8 (N, C, H, W)), normalised by
    mean/std as training normalises them."""
    p = stem_conv.kernel_size[0]
    if stem_conv.kernel_size != stem_conv.stride or stem_conv.groups != 1:
        raise ValueError(f"the stem is not a patchify convolution ({stem_conv})")
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    pick = torch.randint(0, n, (samples,), generator=gen)
    ys = torch.randint(0, h - p + 1, (samples,), generator=gen)
    xs = torch.randint(0, w - p + 1, (samples,), generator=gen)
    offs = torch.arange(p)
    rows = (ys[:, None] + offs)[:, None, :, None]
    cols = (xs[:, None] + offs)[:, None, None, :]
    patches = images[pick[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols].float() / 255
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    with torch.no_grad():
        stem_conv.weight.copy_(patch_whitening((patches - m) / s, stem_conv.out_channels))
        if stem_conv.bias is not None:
            stem_conv.bias.zero_()

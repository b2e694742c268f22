"""Semantic segmentation: UperNet (Xiao et al. 2018) on a multi-scale backbone, as the ConvNeXt paper uses it.

UperNetHead: a pyramid pooling module (PPM) on the stride-32 map, an FPN top-down path over all four maps,
then every level upsampled to stride 4, concatenated and fused by a 3x3 conv; a 1x1 classifier after dropout.
FCNHead: the optional auxiliary head on the stride-16 map (weight 0.4 in the paper's recipe).
`Segmentor` returns {"out": logits, "aux": logits} at the input's size, like torchvision's segmentation models.
Inference on large images: `predict_whole` or `predict_slide` (overlapping windows, logits averaged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convnext.weights.specs import IMAGENET_MEAN, IMAGENET_STD


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """The ConvModule of mmsegmentation: conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PPM(nn.Module):
    """Pyramid pooling: average-pool to each scale, 1x1 conv, upsample back; concatenated with the input."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels, 1)) for s in scales
        )
        self.bottleneck = conv_bn_relu(cin + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        return self.bottleneck(torch.cat([x] + [_resize(b(x), size) for b in self.branches], dim=1))


class UperNetHead(nn.Module):
    """Four maps (strides 4..32, widths `in_channels`) -> logits (B, num_classes, H/4, W/4)."""

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.ppm = PPM(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)] + [self.ppm(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser map, upsampled
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.drop(fused))


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv -> BN -> ReLU -> dropout -> 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.conv(x)))


class Segmentor(nn.Module):
    """backbone (-> dict of 4 maps, `out_channels`) + UperNet head (+ auxiliary FCN head on map `aux_index`).

    forward: (B, 3, H, W) images in [0, 1] (normalised here with `mean`/`std`, as torchvision's detectors do)
    -> {"out": (B, K, H, W)}, plus "aux" in training when there is an auxiliary head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int = 512,
        aux_channels: int = 256,
        aux: bool = True,
        aux_index: int = 2,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UperNetHead(backbone.out_channels, num_classes, channels)
        self.aux_index = aux_index
        self.aux_head = FCNHead(backbone.out_channels[aux_index], num_classes, aux_channels) if aux else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = list(self.backbone((x - self.mean) / self.std).values())
        out = {"out": _resize(self.decode_head(feats), x.shape[2:])}
        if self.aux_head is not None and self.training:
            out["aux"] = _resize(self.aux_head(feats[self.aux_index]), x.shape[2:])
        return out


def segmentation_loss(
    out: dict[str, torch.Tensor], target: torch.Tensor, ignore_index: int = 255, aux_weight: float = 0.4
) -> dict[str, torch.Tensor]:
    """Cross-entropy on the main logits plus `aux_weight` times that of the auxiliary ones; target (B, H, W) int64."""
    losses = {"loss_seg": F.cross_entropy(out["out"], target, ignore_index=ignore_index)}
    if "aux" in out:
        losses["loss_aux"] = aux_weight * F.cross_entropy(out["aux"], target, ignore_index=ignore_index)
    return losses


@torch.no_grad()
def predict_whole(model: nn.Module, image: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (B, K, *out_size) from one forward pass over the whole (B, 3, H, W) image."""
    logits = model(image)["out"]
    return logits if out_size is None or tuple(out_size) == tuple(logits.shape[2:]) else _resize(logits, out_size)


@torch.no_grad()
def predict_slide(
    model: nn.Module,
    image: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits (B, K, *out_size) averaged over overlapping `crop` windows (h, w) every `stride` pixels.

    The windows cover the image exactly: the last row/column of windows is shifted back to end at the border;
    an image smaller than the crop is one window of its own size.
    """
    b, _, h, w = image.shape
    (ch, cw), (sh, sw) = crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    total, count = None, image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(h - ch, 0)), min(c * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            logits = model(image[:, :, y1:y2, x1:x2])["out"]
            if total is None:
                total = image.new_zeros((b, logits.shape[1], h, w))
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    logits = total / count
    return logits if out_size is None or tuple(out_size) == (h, w) else _resize(logits, out_size)

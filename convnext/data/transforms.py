"""Image pipelines (torchvision.transforms.v2): the paper's train augmentation, the eval resize + center crop,
and the per-batch Mixup/CutMix switch.

RandAugment "rand-m9-mstd0.5-inc1" (timm's notation) means: 2 ops, magnitude 9 on a 0-10 scale, the magnitude
drawn per op from N(9, 0.5), severities that increase with the magnitude. torchvision's RandAugment takes one fixed
integer bin, so `RandAugmentMstd` runs it one op at a time with 101 bins (a 0-10 scale in steps of 0.1) and draws
the bin for each op. Unlike timm, every chosen op is applied (timm applies each with probability 0.5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandAugmentMstd(v2.Transform):
    """RandAugment with a magnitude on timm's 0-10 scale and a per-op Gaussian jitter of `magnitude_std`."""

    _BINS = 101  # bin i is magnitude i / 10 on the 0-10 scale

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, fill: Any = None):
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.op = v2.RandAugment(num_ops=1, magnitude=0, num_magnitude_bins=self._BINS, fill=fill)

    def forward(self, *inputs: Any) -> Any:
        out = inputs if len(inputs) > 1 else inputs[0]
        for _ in range(self.num_ops):
            m = self.magnitude
            if self.magnitude_std > 0:
                m = m + self.magnitude_std * float(torch.randn(()))
            self.op.magnitude = int(round(min(max(m, 0.0), 10.0) * 10))
            out = self.op(out)
        return out

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}"


def train_transform(
    img_size: int,
    *,
    crop: str = "rrc",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: bool = True,
    ra_num_ops: int = 2,
    ra_magnitude: float = 9.0,
    ra_magnitude_std: float = 0.5,
    re_prob: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Transform:
    """PIL image -> normalized float tensor (3, img_size, img_size), augmented.

    crop: "rrc" = RandomResizedCrop(scale, ratio); "pad" = pad by img_size/8 (reflect) then a random crop
    (the usual choice for 32x32 CIFAR); "resize" = plain resize (no crop augmentation).
    """
    ops: list[v2.Transform] = [v2.ToImage()]
    if crop == "rrc":
        ops.append(
            v2.RandomResizedCrop(
                img_size,
                scale=tuple(scale),
                ratio=tuple(ratio),
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            )
        )
    elif crop == "pad":
        ops += [
            v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomCrop(img_size, padding=max(img_size // 8, 1), padding_mode="reflect"),
        ]
    elif crop == "resize":
        ops.append(v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
    else:
        raise ValueError(f"data.crop must be 'rrc', 'pad' or 'resize', not {crop!r}")
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment:
        fill = [round(255 * m) for m in mean]  # fill exposed borders with the mean colour, as timm does
        ops.append(RandAugmentMstd(ra_num_ops, ra_magnitude, ra_magnitude_std, fill=fill))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if re_prob > 0:
        ops.append(v2.RandomErasing(re_prob, value="random"))  # per-pixel normal noise (timm's "pixel" mode)
    return v2.Compose(ops)


def eval_transform(
    img_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Transform:
    """PIL image (or uint8 tensor) -> normalized float tensor: resize the short side to img_size / crop_pct,
    then center-crop img_size (224 / 0.875 = 256 -> 224, the paper's eval)."""
    resize = int(round(img_size / crop_pct))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def mix_transform(
    num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5, prob: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-batch Mixup/CutMix: (images (B,C,H,W), int labels (B,)) -> (mixed images, soft labels (B, classes)).

    mixup/cutmix are the Beta alphas (0 = off); with both on, CutMix is picked with `switch_prob`; the whole
    batch is mixed with probability `prob`. Returns None when both are off.
    """
    choices, p = [], []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        p.append(1 - switch_prob if cutmix > 0 else 1.0)
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        p.append(switch_prob if mixup > 0 else 1.0)
    if not choices:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices, p=p)
    if prob < 1.0:
        mix = v2.RandomApply([mix], p=prob)

    def apply(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = mix(x, y)
        if y.ndim == 1:  # RandomApply skipped the mix: make the labels soft anyway, so every batch looks alike
            y = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
        return x, y

    return apply

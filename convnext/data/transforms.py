"""Image pipelines (torchvision.transforms.v2): the paper's train augmentation, the eval resize + center crop,
and the per-batch Mixup/CutMix switch.

RandAugment "rand-m9-mstd0.5-inc1" (timm's notation, the ConvNeXt recipe) means: 2 ops drawn uniformly (with
replacement) from timm's 15 "increasing" ops, each applied with probability 0.5, each at a magnitude drawn from
N(9, 0.5) clipped to the 0-10 scale, with severities that increase with the magnitude and a random sign for the
geometric and enhance ops; borders exposed by a rotation, shear or translation are filled with the mean colour.
`RandAugmentMstd` does that with torchvision.transforms.v2.functional ops and torch's random stream (so
`SeededDataset` seeds it); on tensors it resamples bilinearly (the only smooth mode torchvision's tensor affine
has), where timm's recipe resamples PIL images bicubically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from convnext.constants import CROP_MODES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

# timm's _RAND_INCREASING_TRANSFORMS, by timm's names
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
_ENHANCE = {
    "ColorIncreasing": F.adjust_saturation,
    "ContrastIncreasing": F.adjust_contrast,
    "BrightnessIncreasing": F.adjust_brightness,
    "SharpnessIncreasing": F.adjust_sharpness,
}
Img = Any  # a uint8 image tensor (..., 3, H, W), tv_tensors.Image, or PIL image


def augment_op(
    img: Img,
    name: str,
    magnitude: float,
    sign: float = 1.0,
    fill: Sequence[int] = (128, 128, 128),
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
) -> Img:
    """One RandAugment op of `RAND_INCREASING_OPS` at `magnitude` (0-10) as timm's "inc1" ops do it.

    sign: +1 or -1, the direction of Rotate, Shear*, Translate*Rel and the enhance ops (ignored by the others).
    fill: the colour of exposed borders. Returns the same kind of image.
    """
    level = magnitude / 10.0
    match name:
        case "AutoContrast":
            return F.autocontrast(img)
        case "Equalize":
            return F.equalize(img)
        case "Invert":
            return F.invert(img)
        case "Rotate":  # up to 30 degrees
            return F.rotate(img, sign * 30.0 * level, interpolation=interpolation, fill=list(fill))
        case "PosterizeIncreasing":  # keep 4 bits down to 0 (black; Pillow >= 13 refuses 0 bits, so not through it)
            bits = 4 - int(level * 4)
            if bits == 0 and isinstance(img, Image.Image):
                return Image.new(img.mode, img.size)
            return F.posterize(img, bits)
        case "SolarizeIncreasing":  # invert pixels >= threshold, from 256 (none) down to 0 (all)
            threshold = 256 - min(256, int(level * 256))
            return img if threshold > 255 else F.solarize(img, threshold)
        case "SolarizeAdd":  # add up to 110 to pixels below 128
            return _solarize_add(img, min(128, int(level * 110)))
        case "ColorIncreasing" | "ContrastIncreasing" | "BrightnessIncreasing" | "SharpnessIncreasing":
            return _ENHANCE[name](img, max(0.1, 1.0 + sign * 0.9 * level))  # blend factor 1 +- 0.9
        case "ShearX" | "ShearY":  # up to 0.3: output (x, y) reads input (x + 0.3 y, y), about the top-left corner
            angle = math.degrees(math.atan(sign * 0.3 * level))
            shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
            return F.affine(img, 0.0, [0.0, 0.0], 1.0, shear, interpolation, list(fill), center=[0.0, 0.0])
        case "TranslateXRel" | "TranslateYRel":  # up to 45% of the side; +1 moves the content left / up
            h, w = F.get_size(img)
            shift = -sign * 0.45 * level
            translate = [shift * w, 0.0] if name == "TranslateXRel" else [0.0, shift * h]
            return F.affine(img, 0.0, translate, 1.0, [0.0, 0.0], interpolation, list(fill))
    raise ValueError(f"unknown RandAugment op {name!r}; choose from {', '.join(RAND_INCREASING_OPS)}")


def _solarize_add(img: Img, add: int, threshold: int = 128) -> Img:
    if isinstance(img, Image.Image):
        return img.point([min(255, i + add) if i < threshold else i for i in range(256)] * len(img.getbands()))
    out = torch.where(img < threshold, (img.int() + add).clamp_(max=255).to(img.dtype), img)
    return tv_tensors.wrap(out, like=img) if isinstance(img, tv_tensors.TVTensor) else out


class RandAugmentMstd(v2.Transform):
    """timm's RandAugment "rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1" with per-op probability `prob`.

    Each of `num_ops` ops is drawn uniformly from `ops` (with replacement), applied with probability `prob`, at a
    magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10] and a random sign. fill: the border colour
    (0-255 per channel; None = timm's default grey 128). Takes and returns a uint8 image tensor or a PIL image.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        fill: Sequence[int] | int | None = None,
        prob: float = 0.5,
        ops: Sequence[str] = RAND_INCREASING_OPS,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    ):
        super().__init__()
        unknown = sorted(set(ops) - set(RAND_INCREASING_OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; choose from {', '.join(RAND_INCREASING_OPS)}")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill = [fill] * 3 if isinstance(fill, int) else list(fill or (128, 128, 128))
        self.ops, self.interpolation = tuple(ops), interpolation

    def forward(self, img: Img) -> Img:
        for i in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if torch.rand(()) >= self.prob:
                continue
            m = self.magnitude + self.magnitude_std * float(torch.randn(()))
            sign = -1.0 if torch.rand(()) < 0.5 else 1.0
            img = augment_op(img, self.ops[i], min(max(m, 0.0), 10.0), sign, self.fill, self.interpolation)
        return img

    def extra_repr(self) -> str:
        return (
            f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
            f"prob={self.prob}, fill={self.fill}"
        )


def pad_pixels(img_size: int, translate: int | None) -> int:
    """The reflect padding (= the largest translation) of the "pad" crop: `translate`, or 1/8 of the side."""
    if translate is None:
        return max(img_size // 8, 1)
    if translate < 0:
        raise ValueError(f"data.translate must be >= 0 pixels, got {translate}")
    return translate


def train_transform(
    img_size: int,
    *,
    crop: str = "rrc",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    translate: int | None = None,
    randaugment: bool = True,
    ra_num_ops: int = 2,
    ra_magnitude: float = 9.0,
    ra_magnitude_std: float = 0.5,
    re_prob: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Transform:
    """PIL image -> normalized float tensor (3, img_size, img_size), augmented.

    crop: "rrc" = RandomResizedCrop(scale, ratio); "pad" = pad by `translate` pixels (reflect; default img_size/8)
    then a random crop (the usual choice for 32x32 CIFAR); "resize" = plain resize (no crop augmentation).
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
            v2.RandomCrop(img_size, padding=pad_pixels(img_size, translate), padding_mode="reflect"),
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
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> v2.Transform:
    """PIL image (or uint8 tensor) -> normalized float tensor: resize the short side to img_size / crop_pct,
    then center-crop img_size (224 / 0.875 = 256 -> 224, the paper's eval).

    interpolation: the resize filter, "bicubic", "bilinear" (torchvision's weights) or "nearest".
    crop_mode: "center" as above, or "squash": resize both sides to img_size / crop_pct, aspect not kept, then
        center-crop (with crop_pct 1 the whole image is warped to img_size, the official >= 384 px eval).
    """
    resize = int(round(img_size / crop_pct))
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, not {crop_mode!r}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(
                resize if crop_mode == "center" else (resize, resize),
                interpolation=interpolation_mode(interpolation),
                antialias=True,
            ),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def first_resize_side(transform: Any) -> int | None:
    """The short side `transform` resizes an image to before anything else looks at its pixels (a v2.Resize,
    alone or first in a v2.Compose after v2.ToImage), or None: what `load_image(path, min_side)` may decode at."""
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    for step in steps:
        if isinstance(step, v2.ToImage):
            continue
        if isinstance(step, v2.Resize) and step.max_size is None:
            return min(step.size) if step.size else None
        return None
    return None


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """torchvision's mode for a filter name: "bicubic", "bilinear" or "nearest" (the names specs and timm use)."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {name!r}")
    return v2.InterpolationMode(name)


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


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flip: bool, shift: int = 0):
    """Test-time augmentation: the mean float32 logits of `model` over views of the batch x (B, C, H, W).

    flip: each view and its mirror image; shift: also the batch translated by `shift` pixels up-left and
    down-right (reflect-padded, as the training crops pad), airbench's "translate" test-time augmentation. The
    views: 1 (neither), 2 (flip), 3 (shift) or 6 (both).
    """
    views = [x]
    if shift > 0:
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
        views += [padded[..., 2 * shift :, 2 * shift :], padded[..., :h, :w]]
    if flip:
        views += [v.flip(-1) for v in views]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return sum(model(v.contiguous(memory_format=layout)).float() for v in views) / len(views)

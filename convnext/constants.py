"""Constants every layer shares: normalisation statistics, the eval resize's choices, the ImageNet-1k class names.

At the bottom of the package (beside `model.py`): it imports nothing of `convnext`.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # the eval resize filter
CROP_MODES = ("center", "squash")  # center: short side to size / crop_pct; squash: both sides (aspect not kept)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, offline, from torchvision's weight metadata."""
    from torchvision.models import ConvNeXt_Tiny_Weights

    return list(ConvNeXt_Tiny_Weights.IMAGENET1K_V1.meta["categories"])

"""RandAugment "rand-m9-mstd0.5-inc1" against timm's own: each op at a fixed magnitude and sign, the spread of each
op's effect with the magnitude jitter, and the whole policy (2 ops at p=0.5: a quarter of the images unchanged)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from torchvision import tv_tensors

from convnext.data.transforms import RAND_INCREASING_OPS, RandAugmentMstd, augment_op

FILL = (124, 116, 104)  # round(255 * ImageNet mean)
HPARAMS = {"translate_const": 100, "img_mean": FILL, "interpolation": Image.BILINEAR}  # bilinear: as on tensors
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _picture(h: int = 32, w: int = 48) -> np.ndarray:
    """An (H, W, 3) uint8 picture that every op changes (no channel spans 0-255, values below 128, fine detail)."""
    y, x = np.mgrid[0:h, 0:w]
    r = 128 + 80 * np.sin(x / 6.0) * np.cos(y / 9.0) + 15 * np.sin(1.7 * x) * np.sin(1.3 * y)  # and fine detail
    g = 40 + 3 * x + 0.5 * y
    b = 200 - 2.5 * y + 20 * np.sin((x + y) / 4)
    return np.clip(np.dstack([r, g, b]), 0, 255).astype(np.uint8)


PICTURE = _picture()
PIL_IMAGE = Image.fromarray(PICTURE)
TENSOR = torch.from_numpy(PICTURE).permute(2, 0, 1).contiguous()  # (3, H, W) uint8


@pytest.fixture(autouse=True)
def timm_posterize_zero_bits(monkeypatch):
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which Pillow >= 13 refuses; older Pillow (and we)
    give black."""

    def posterize(img: Image.Image, bits: int, **_) -> Image.Image:
        return Image.new(img.mode, img.size) if bits == 0 else ImageOps.posterize(img, bits)

    monkeypatch.setitem(timm_aa.NAME_TO_OP, "PosterizeIncreasing", posterize)


def _timm_op(name: str, magnitude: float, magnitude_std: float = 0.0) -> timm_aa.AugmentOp:
    return timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=HPARAMS | {"magnitude_std": magnitude_std})


def _hwc(img) -> np.ndarray:
    return np.asarray(img).astype(int) if isinstance(img, Image.Image) else img.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize("name", RAND_INCREASING_OPS)
def test_each_op_matches_timm_at_a_fixed_magnitude_and_sign(name, monkeypatch):
    for magnitude in (3.7, 9.0, 10.0):
        for sign in (1.0, -1.0):
            monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, s=sign: s * v)
            expected = _hwc(_timm_op(name, magnitude)(PIL_IMAGE))
            on_pil = np.abs(_hwc(augment_op(PIL_IMAGE, name, magnitude, sign, FILL)) - expected)
            assert on_pil.max() <= 1, (name, magnitude, sign)  # the same PIL kernels
            on_tensor = np.abs(_hwc(augment_op(TENSOR, name, magnitude, sign, FILL)) - expected)
            if name in GEOMETRIC:  # grid_sample blends the one-pixel seam with the fill; PIL does not
                assert on_tensor.mean() < 2 and (on_tensor.max(-1) > 2).mean() < 0.05, (name, magnitude, sign)
            else:
                assert on_tensor.max() <= 1, (name, magnitude, sign)


def _change(img) -> float:
    return float(np.abs(_hwc(img) - PICTURE.astype(int)).mean())


def test_each_op_spreads_like_timm_with_the_magnitude_jitter():
    torch.manual_seed(0)
    random.seed(0)
    for name in RAND_INCREASING_OPS:
        ours = RandAugmentMstd(num_ops=1, magnitude=9, magnitude_std=0.5, fill=FILL, prob=1.0, ops=[name])
        theirs = _timm_op(name, 9, magnitude_std=0.5)
        a = np.array([_change(ours(TENSOR)) for _ in range(80)])
        b = np.array([_change(theirs(PIL_IMAGE)) for _ in range(80)])
        assert a.min() > 0 and b.min() > 0, name  # every draw changes the picture
        tol = 0.1 * b.mean() + 0.5
        assert abs(a.mean() - b.mean()) <= tol, (name, a.mean(), b.mean())
        # the whole distribution (two modes for the signed ops): Wasserstein-1 distance of the samples
        assert np.abs(np.sort(a) - np.sort(b)).mean() <= tol, (name, np.sort(a), np.sort(b))


def test_the_whole_policy_matches_timm():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    ours = RandAugmentMstd(num_ops=2, magnitude=9, magnitude_std=0.5, fill=FILL)  # prob 0.5 by default
    theirs = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(HPARAMS))
    a = np.array([_change(ours(TENSOR)) for _ in range(500)])
    b = np.array([_change(theirs(PIL_IMAGE)) for _ in range(500)])
    for changes in (a, b):
        assert abs((changes == 0).mean() - 0.25) < 0.05  # neither op applied: 0.5 * 0.5
    assert abs(a.mean() - b.mean()) <= 0.1 * b.mean(), (a.mean(), b.mean())
    assert abs(a.std() - b.std()) <= 0.15 * b.std(), (a.std(), b.std())


def test_randaugment_keeps_the_image_kind_and_follows_torch_seed():
    ra = RandAugmentMstd(fill=list(FILL), prob=1.0)
    image = tv_tensors.Image(TENSOR)
    torch.manual_seed(3)
    out = ra(image)
    torch.manual_seed(3)
    assert isinstance(out, tv_tensors.Image) and torch.equal(out, ra(image))  # SeededDataset relies on this
    assert isinstance(ra(PIL_IMAGE), Image.Image)
    assert torch.equal(RandAugmentMstd(prob=0.0)(TENSOR), TENSOR)
    assert "prob=1.0" in repr(ra)
    with pytest.raises(ValueError, match="unknown RandAugment ops \\['Cutout'\\]"):
        RandAugmentMstd(ops=["Cutout"])

"""The in-memory data path: batch augmentation, its per-image randomness, the loader, and the memory check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convnext.data.cache import (
    BatchAugment,
    CachedImages,
    CachedLoader,
    cache_size,
    epoch_key,
    fits_in_memory,
    uniform,
)
from convnext.engine.distributed import DistInfo, ResumableSampler


def _images(n: int = 8, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.5


def test_uniform_is_a_pure_function_of_key_and_position():
    u = uniform(123, torch.arange(4000), 3)
    assert u.shape == (4000, 3) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.02
    torch.testing.assert_close(uniform(123, torch.tensor([7, 3]), 3), u[[7, 3]], rtol=0, atol=0)
    assert not torch.equal(uniform(124, torch.arange(10), 3), u[:10])


def test_resize_without_flip_is_only_normalisation():
    x = _images()
    aug = BatchAugment(12, crop="resize", hflip=0.0)
    torch.testing.assert_close(aug(x, 0, torch.arange(8)), _normalised(x))


def test_full_box_resized_crop_is_the_image_or_its_mirror():
    x = _images()
    keep = BatchAugment(12, crop="rrc", scale=(1, 1), ratio=(1, 1), hflip=0.0)
    torch.testing.assert_close(keep(x, 0, torch.arange(8)), _normalised(x), atol=1e-4, rtol=0)
    mirror = BatchAugment(12, crop="rrc", scale=(1, 1), ratio=(1, 1), hflip=1.0)
    torch.testing.assert_close(mirror(x, 0, torch.arange(8)), _normalised(x).flip(-1), atol=1e-4, rtol=0)


def test_resized_crop_boxes_stay_inside_and_vary():
    x = torch.arange(16, dtype=torch.float32).repeat(16, 1).expand(64, 3, 16, 16).to(torch.uint8)  # column index
    aug = BatchAugment(8, crop="rrc", scale=(0.2, 0.5), hflip=0.0, mean=(0, 0, 0), std=(1 / 255,) * 3)
    out = aug(x, 5, torch.arange(64))
    assert out.shape == (64, 3, 8, 8)
    assert out.min() >= 0 and out.max() <= 15
    widths = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert widths.std() > 0.5  # boxes of different sizes


def test_resized_crop_is_torchvisions_resized_crop_of_a_box():
    """Each image is torchvision's resized_crop (antialiased bilinear, uint8) of one integer box, mirrored if
    flipped."""
    from torchvision.transforms.v2 import functional as TF

    x = _images(6, 16)
    side = round((0.3 * 16 * 16) ** 0.5)  # the box's area share and aspect are fixed: only its place varies
    raw = {"mean": (0,) * 3, "std": (1 / 255,) * 3}  # normalising leaves the 0-255 values
    for hflip in (0.0, 1.0):
        out = BatchAugment(10, crop="rrc", scale=(0.3, 0.3), ratio=(1, 1), hflip=hflip, **raw)(x, 3, torch.arange(6))
        places = set()
        for i in range(6):
            views = {
                (top, left): TF.resized_crop(x[i], top, left, side, side, [10, 10], antialias=True).float()
                for top in range(17 - side)
                for left in range(17 - side)
            }
            found = [place for place, v in views.items() if torch.equal(v.flip(-1) if hflip else v, out[i])]
            assert found, f"image {i} is no resized crop of a {side}px box"
            places.add(found[0])
        assert len(places) > 1


def test_translation_is_a_crop_of_the_reflect_padded_image():
    x = _images(4, 16)
    aug = BatchAugment(16, crop="pad", hflip=0.0)
    out = aug(x, 9, torch.arange(4))
    padded = F.pad(_normalised(x), (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(4):
        crops = {(dy, dx): padded[i, :, dy : dy + 16, dx : dx + 16] for dy in range(5) for dx in range(5)}
        found = [shift for shift, crop in crops.items() if torch.allclose(crop, out[i], atol=1e-5)]
        assert found, f"image {i} is no crop of its padded self"
        shifts.add(found[0])
    assert len(shifts) > 1


def test_translate_bounds_the_shift_and_zero_keeps_the_image():
    x = _images(16, 16)
    moved = BatchAugment(16, crop="pad", hflip=0.0, translate=1)(x, 5, torch.arange(16))
    padded = F.pad(_normalised(x), (1, 1, 1, 1), mode="reflect")
    for i in range(16):  # each image is one of the 9 crops within 1 px
        crops = [padded[i, :, dy : dy + 16, dx : dx + 16] for dy in range(3) for dx in range(3)]
        assert any(torch.allclose(c, moved[i], atol=1e-5) for c in crops), f"image {i} moved more than 1 px"
    still = BatchAugment(16, crop="pad", hflip=0.0, translate=0)(x, 5, torch.arange(16))
    torch.testing.assert_close(still, _normalised(x))
    with pytest.raises(ValueError, match="data.translate"):
        BatchAugment(16, crop="pad", translate=-1)


def test_a_flip_mirrors_the_same_window():
    x = _images(6, 16)
    for crop in ("pad", "resize"):
        plain = BatchAugment(16, crop=crop, hflip=0.0)(x, 9, torch.arange(6))
        mirrored = BatchAugment(16, crop=crop, hflip=1.0)(x, 9, torch.arange(6))  # the same draws, all flipped
        torch.testing.assert_close(mirrored, plain.flip(-1), rtol=0, atol=0)
        assert mirrored.is_contiguous(memory_format=torch.channels_last)
    half = BatchAugment(16, crop="pad", hflip=0.5)(x, 9, torch.arange(6))
    plain = BatchAugment(16, crop="pad", hflip=0.0)(x, 9, torch.arange(6))
    flipped = [not torch.equal(half[i], plain[i]) for i in range(6)]
    assert any(flipped) and not all(flipped)
    for i in range(6):
        assert torch.equal(half[i], plain[i].flip(-1) if flipped[i] else plain[i])


def test_an_images_augmentation_does_not_depend_on_its_batch():
    x = _images(8)
    aug = BatchAugment(12, crop="rrc", scale=(0.3, 1.0))
    whole = aug(x, 42, torch.arange(8))
    halves = torch.cat([aug(x[:4], 42, torch.arange(4)), aug(x[4:], 42, torch.arange(4, 8))])
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)


def test_loader_resumes_mid_epoch_and_splits_across_processes_like_one():
    cache = CachedImages(_images(12), torch.arange(12), 0)
    aug = BatchAugment(12, crop="pad")

    def batches(world: int, rank: int, batch: int, skip: int = 0) -> list[torch.Tensor]:
        sampler = ResumableSampler(cache, DistInfo(rank, world), seed=3)
        sampler.set_epoch(1, skip=skip)
        loader = CachedLoader(cache, sampler, batch, augment=aug, drop_last=True, seed=3, rank=rank, world=world)
        loader.set_epoch(1)
        return [x for x, _, _ in loader]

    one = batches(1, 0, 4)
    assert torch.equal(torch.cat(batches(1, 0, 4, skip=4)), torch.cat(one[1:]))  # resumed after one batch
    r0, r1 = batches(2, 0, 2), batches(2, 1, 2)
    for step in range(3):  # global batch 4 = 2 per process: the same pixels, interleaved as DistributedSampler does
        both = torch.stack([r0[step], r1[step]], 1).flatten(0, 1)
        assert torch.equal(both, one[step])


def test_cache_size_and_memory_check():
    assert cache_size(32, "pad", 32) == 32
    assert cache_size(64, "rrc", 500) == 73 and cache_size(64, "rrc", 66) == 66 and cache_size(64, "rrc", 40) == 64
    ok, words = fits_in_memory(1, 0.5)
    assert ok and "MiB" in words
    assert not fits_in_memory(2**60, 0.5)[0]
    assert epoch_key(0, 1) != epoch_key(0, 2)

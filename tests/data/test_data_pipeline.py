"""Datasets and transforms: digits, image folders (split folders or a held-out fraction), bad images,
Mixup/CutMix, eval resize + center crop, seeded per-sample augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext.data import (
    SeededDataset,
    build_dataset,
    build_eval_dataset,
    collate_skip,
    eval_transform,
    load_image,
    mix_transform,
    train_transform,
)
from convnext.data.datasets import split_indices


def _folder(root: Path, splits=("train", "val"), classes=("a", "b"), n=4) -> Path:
    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            d = root / s / c if s else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def test_digits_is_embedded_and_split_stratified():
    train, classes = build_dataset("digits", "train")
    val, _ = build_dataset("digits", "val")
    assert classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797 and len(val) == 360
    img, label = train[0]
    assert img.mode == "RGB" and img.size == (8, 8) and 0 <= label < 10
    counts = np.bincount([val[i][1] for i in range(len(val))], minlength=10)
    assert counts.min() >= 35  # every class held out in proportion


def test_image_folder_train_val_and_test_alias(tmp_path):
    root = _folder(tmp_path / "ds", splits=("train", "test"))
    train, classes = build_dataset(str(root), "train")
    val, val_classes = build_dataset(str(root), "val")  # `test` stands in for `val`
    assert classes == val_classes == ["a", "b"] and len(train) == len(val) == 8


def test_image_folder_held_out_fraction(tmp_path):
    root = _folder(tmp_path / "flat", splits=("",), n=10)  # root/<class>/*.jpg, no split folders
    train, _ = build_dataset(str(root), "train", val_split=0.2)
    val, _ = build_dataset(str(root), "val", val_split=0.2)
    assert len(train) == 16 and len(val) == 4
    tr, va = split_indices(train.dataset.targets, 0.2, seed=0)
    assert not set(tr) & set(va)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor one of"):
        build_dataset(str(tmp_path / "nope"), "train")
    (tmp_path / "e" / "train" / "x").mkdir(parents=True)
    (tmp_path / "e" / "val" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        build_dataset(str(tmp_path / "e"), "train")


def test_bad_image_error_names_file_or_is_skipped(tmp_path):
    root = _folder(tmp_path / "ds")
    bad = root / "train" / "b" / "2.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="cannot read image .*2.jpg"):
        load_image(bad)
    ds, _ = build_dataset(str(root), "train", eval_transform(16, 1.0))
    with pytest.raises(ValueError, match="2.jpg"):
        [ds[i] for i in range(len(ds))]
    ds, _ = build_dataset(str(root), "train", eval_transform(16, 1.0), skip_bad_images=True)
    x, y, skipped = collate_skip([ds[i] for i in range(len(ds))])
    assert skipped == 1 and x.shape == (7, 3, 16, 16) and len(y) == 7


def test_eval_transform_resizes_then_center_crops():
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    x = eval_transform(224, 0.875)(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    ds, classes = build_eval_dataset("digits", img_size=16, crop_pct=1.0)
    assert ds[0][0].shape == (3, 16, 16) and len(classes) == 10


def test_train_transform_paper_recipe_shapes():
    tf = train_transform(32)  # RandomResizedCrop, flip, RandAugment m9 mstd0.5 inc1 p0.5, random erasing 0.25
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:4] == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "RandAugmentMstd"]
    assert names[-1] == "RandomErasing" and tf.transforms[-1].p == 0.25
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert tf(img).shape == (3, 32, 32)


def test_mixup_cutmix_soft_labels():
    mix = mix_transform(5, mixup=0.8, cutmix=1.0, switch_prob=0.5)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    for _ in range(5):
        xm, ym = mix(x, y)
        assert xm.shape == x.shape and ym.shape == (8, 5)
        torch.testing.assert_close(ym.sum(1), torch.ones(8))
    assert mix_transform(5, mixup=0.0, cutmix=0.0) is None
    half = mix_transform(5, mixup=0.8, cutmix=0.0, prob=0.0)
    assert torch.equal(half(x, y)[1], torch.nn.functional.one_hot(y, 5).float())


def test_seeded_dataset_augmentation_depends_on_seed_epoch_index_only():
    ds, _ = build_dataset("digits", "train", train_transform(16, hflip=0.0, randaugment=True))
    s = SeededDataset(ds, seed=3)
    a = s[5][0]
    torch.manual_seed(123)  # the global stream does not matter ...
    assert torch.equal(a, s[5][0])
    s.set_epoch(1)  # ... the epoch does
    assert not torch.equal(a, s[5][0])


def test_cifar_missing_locally_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"cifar10 not found in {tmp_path}.*--data-dir"):
        build_dataset("cifar10", "train", data_dir=str(tmp_path), download=False)


def test_tta_logits_averages_flips_and_one_pixel_translations():
    from convnext.data import tta_logits

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = lambda v: v.flatten(1)  # noqa: E731  a "model" that returns its input: the mean of the views shows
    assert torch.equal(tta_logits(views, x, False), x.flatten(1))
    flip = tta_logits(views, x, True).view_as(x)
    torch.testing.assert_close(flip, (x + x.flip(-1)) / 2)
    shift = tta_logits(views, x, False, shift=1).view_as(x)
    inner = (x[..., 1:4, 1:4] + x[..., 2:5, 2:5] + x[..., 0:3, 0:3]) / 3  # the pixel and its diagonal neighbours
    torch.testing.assert_close(shift[..., 1:4, 1:4], inner)
    both = tta_logits(views, x.contiguous(memory_format=torch.channels_last), True, shift=1).view_as(x)
    torch.testing.assert_close(both, (shift + shift.flip(-1)) / 2)

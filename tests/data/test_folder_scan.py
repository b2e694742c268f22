"""The image-folder scan under hostile layouts: a FIFO named like an image, a symlink loop, a second link."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from convnext.data.datasets import ImageFolder


def _folder(root: Path, per_class: int = 3) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_fifo_named_like_an_image_is_not_listed(tmp_path):
    root = _folder(tmp_path / "train")
    os.mkfifo(root / "cat" / "pipe.jpg")
    ds = ImageFolder(root)
    assert len(ds) == 6 and not any(p.endswith("pipe.jpg") for p, _ in ds.samples)


def test_a_symlink_loop_and_a_second_link_add_nothing(tmp_path):
    root = _folder(tmp_path / "train")
    os.symlink("..", root / "cat" / "loopdir")  # points back up at train/: every class again, labelled cat
    os.symlink(root / "dog", root / "dog" / "again")
    ds = ImageFolder(root)
    assert len(ds) == 6
    assert sorted(ds.targets) == [0, 0, 0, 1, 1, 1]


def test_a_linked_folder_of_other_images_is_still_read(tmp_path):
    root = _folder(tmp_path / "train")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "x.png")
    os.symlink(extra, root / "cat" / "more")
    assert len(ImageFolder(root)) == 7


def test_gif_images_are_counted_as_predict_counts_them(tmp_path):
    root = _folder(tmp_path / "train")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("P").save(root / "dog" / "anim.gif")
    ds = ImageFolder(root)
    assert len(ds) == 7 and ds[6][0].mode == "RGB"

"""Pre-training needs no labels: a flat folder of images (and train/ val/ folders that are flat) trains, with a
val share held out (`data.val_split`) when there is no val folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from convnext.pretrain import pretrain


def write_flat(root: Path, n: int, side: int = 32) -> Path:
    """root/NNN.png: `n` random `side` x `side` pictures, no class folders."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_pretrain_trains_one_step_on_a_flat_folder(tiny, tmp_path):
    data = write_flat(tmp_path / "pics", 10)  # 1 held out at data.val_split 0.1, 9 train: one batch of 8
    result = pretrain(tiny(data, tmp_path / "run", epochs=1))
    assert result["steps"] == 1 and result["epochs"] == 1 and 0 < result["loss"] < 10
    assert (tmp_path / "run" / "last.pt").is_file()


def test_pretrain_trains_on_flat_train_and_val_folders(tiny, tmp_path):
    data = tmp_path / "pics"
    write_flat(data / "train", 8)
    write_flat(data / "val", 2)
    result = pretrain(tiny(data, tmp_path / "run", epochs=1))
    assert result["steps"] == 1 and 0 < result["loss"] < 10

"""Shared fixtures for the pre-training tests: a small folder of random pictures and a tiny, fast FCMAE config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext.pretrain import PretrainConfig, fcmae_small
from convnext.train import apply_overrides

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}  # a 4-stage ConvNeXt V2 with widths 8..64


def _write_folder(root: Path, side: int = 32, train: int = 12, val: int = 4, classes: tuple[str, ...] = ("a", "b")):
    """root/{train,val}/<class>/*.png: `side` x `side` pictures of blobs on noise, random colours."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, (side, side, 3)).astype(np.uint8)
                cy, cx, r = rng.integers(0, side, 2).tolist() + [int(rng.integers(2, max(side // 3, 3)))]
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(120, 256, 3)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _write_folder(tmp_path / "pics")


@pytest.fixture
def write_folder():
    """write_folder(root, side=32, train=12, val=4, classes=("a", "b")) -> root."""
    return _write_folder


def _tiny(data: Path | str, output: Path, **overrides) -> PretrainConfig:
    """The small recipe shrunk: the tiny V2 model at 32 px with a 1x1 stem (8 px patches, a 4x4 grid), batch 8."""
    cfg = fcmae_small("convnextv2_atto", batch_size=8, epochs=2)
    cfg.model.kwargs = dict(TINY)
    over = {
        "data.name": str(data),
        "data.img_size": 32,
        "model.patch_size": 1,
        "data.num_workers": 0,
        "data.eval_images": 8,
        "fcmae.decoder_dim": 32,
        "output": str(output),
        "threads": 1,
        "device": "cpu",
    }
    return apply_overrides(cfg, over | overrides)


@pytest.fixture
def tiny():
    """tiny(data, output, **overrides) -> PretrainConfig."""
    return _tiny


@pytest.fixture
def tiny_args() -> list[str]:
    """CLI flags for the tiny config above."""
    kwargs = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'
    return ["--model.kwargs", kwargs, "--img-size", "32", "--model.patch_size", "1", "--batch-size", "8",
            "--data.num_workers", "0", "--data.eval_images", "8", "--fcmae.decoder_dim", "32", "--threads", "1",
            "--device", "cpu"]  # fmt: skip

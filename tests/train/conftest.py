"""Shared fixtures for the training tests: a small real image folder and a tiny, fast training config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnext.train import TrainConfig, apply_overrides, get_preset

ROOT = Path(__file__).resolve().parents[2]


def write_image_folder(root: Path, classes: tuple[str, ...] = ("circle", "square", "stripe"), n: int = 12) -> Path:
    """root/{train,val}/<class>/*.png: 24x24 pictures of three kinds of shapes with random colours and noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(n // 2, 1) + 1)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, (24, 24, 3)).astype(np.uint8)
                color = rng.integers(120, 256, 3)
                yy, xx = np.mgrid[:24, :24]
                if c % 3 == 0:
                    mask = (yy - 12) ** 2 + (xx - 12) ** 2 < 49
                elif c % 3 == 1:
                    mask = (abs(yy - 12) < 6) & (abs(xx - 12) < 6)
                else:
                    mask = (xx // 3) % 2 == 0
                img[mask] = color
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "shapes")


def _tiny_config(data: Path | str, output: Path, **overrides) -> TrainConfig:
    """The demo preset shrunk: a 4-stage ConvNeXt with widths 8..64 at 16x16, one thread, no workers."""
    cfg = get_preset("demo")
    cfg.model.kwargs = {"depths": [1, 1, 2, 1], "dims": [8, 16, 32, 64]}
    apply_overrides(
        cfg,
        {
            "data.name": str(data),
            "data.img_size": 16,
            "data.num_workers": 0,
            "output": str(output),
            "epochs": 2,
            "batch_size": 6,
            "threads": 1,
            "device": "cpu",
            **overrides,
        },
    )
    return cfg


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m convnext ...` in a fresh process with one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "convnext", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def tiny_config():
    """tiny_config(data, output, **overrides) -> TrainConfig."""
    return _tiny_config


@pytest.fixture
def run_cli():
    """run_cli(*args, timeout=120) -> CompletedProcess of `python -m convnext ...`."""
    return _run_cli


@pytest.fixture
def tiny_args() -> list[str]:
    """CLI flags for the tiny model of `tiny_config` at 16x16 on one thread, no workers."""
    kwargs = '{"depths": [1, 1, 2, 1], "dims": [8, 16, 32, 64]}'
    return ["--model.kwargs", kwargs, "--threads", "1", "--img-size", "16", "--data.num_workers", "0"]

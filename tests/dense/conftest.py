"""Tiny synthetic datasets in the standard layouts, written to tmp_path (a few 64-96 px PNGs each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_instance_folder(root: Path, n: int = 6, size: tuple[int, int] = (80, 96), seed: int = 0) -> Path:
    """Penn-Fudan layout: PNGImages/img{i}.png and PedMasks/img{i}_mask.png with 0-2 bright rectangles each."""
    rng = np.random.default_rng(seed)
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    h, w = size
    for i in range(n):
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        for k in range(1, i % 3 + 1):  # image 0 has no pedestrian
            y, x = rng.integers(0, h - 40), rng.integers(0, w - 24)
            mask[y : y + 36, x : x + 20] = k
            img[y : y + 36, x : x + 20] = (200, 180, 60 * k)
        Image.fromarray(img).save(root / "PNGImages" / f"img{i}.png")
        Image.fromarray(mask, mode="L").save(root / "PedMasks" / f"img{i}_mask.png")
    return root


def write_label_folder(root: Path, n: int = 4, size: tuple[int, int] = (64, 80), seed: int = 0) -> Path:
    """images/s{i}.jpg + labels/s{i}.png: classes 0 (top), 1 (bottom left), 2 (bottom right), id 3 = void."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    h, w = size
    for i in range(n):
        label = np.zeros((h, w), dtype=np.uint8)
        label[h // 2 :, : w // 2] = 1
        label[h // 2 :, w // 2 :] = 2
        label[:2] = 3
        colours = np.array([(30, 60, 200), (40, 160, 40), (160, 40, 40), (0, 0, 0)], dtype=np.uint8)
        img = np.clip(colours[label].astype(int) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"s{i}.jpg")
        Image.fromarray(label, mode="L").save(root / "labels" / f"s{i}.png")
    return root


def write_coco(root: Path) -> Path:
    """images/a.png (64x64) with a box half outside, a degenerate box, an empty mask and a crowd region;
    images/b.png with no annotations. Categories 7 ("cat") and 3 ("dog"): labels 1 = dog, 2 = cat."""
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(root / "images" / name)
    square = [[10, 10, 30, 10, 30, 30, 10, 30]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "segmentation": square, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 40, 30, 10],
         "segmentation": [[50, 40, 64, 40, 64, 50, 50, 50]], "iscrowd": 0},  # runs 16 px past the right edge
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0.5, 10], "segmentation": square, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [0, 40, 8, 8], "segmentation": [], "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [30, 30, 5, 5],
         "segmentation": [[30, 30, 35, 30, 35, 35, 30, 35]], "iscrowd": 1},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 64},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
        ],
        "annotations": anns,
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def instance_folder(tmp_path: Path) -> Path:
    return write_instance_folder(tmp_path / "peds")


@pytest.fixture
def label_folder(tmp_path: Path) -> Path:
    return write_label_folder(tmp_path / "seg")


@pytest.fixture
def coco_folder(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")

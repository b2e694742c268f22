"""The `auto` recipe (the default for `convnext train --data DIR`), the in-memory data path inside a run, and the
patch-whitening stem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext.train import auto_recipe, fit
from convnext.train.whiten import patch_whitening, whiten_stem


def _photo_folder(root: Path, side: int = 40, n: int = 10) -> Path:
    """root/{train,val}/{dark,bright}/*.jpg, larger than the training size (like photos)."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c, name in enumerate(("dark", "bright")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (side, side + 8, 3)) + 150 * c
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.jpg")
    return root


def test_auto_recipe_fits_the_data_and_says_why(image_folder, tmp_path):
    cfg = auto_recipe(str(image_folder), img_size=16, budget_min=5, model="convnext_atto")
    assert cfg.data.img_size == 16 and cfg.data.crop == "rrc"  # 24px sources >= 1.25 x 16: a crop margin
    assert cfg.model.patch_size == 2  # 16 px: only the 2x2 stem keeps an 8x8 token grid
    assert cfg.sched.name == "linear" and cfg.sched.min_lr == 0 and cfg.data.tta_flip
    assert cfg.optim.name == "muon" and any(line.startswith("Muon on the blocks' matrices") for line in cfg.recipe)
    assert cfg.data.mixup == 0.8 and cfg.model.drop_path_rate == 0.1  # 36 images, 5 min: thousands of passes
    assert all(0 < m < 1 for m in cfg.data.mean) and cfg.data.mean != (0.485, 0.456, 0.406)
    assert any(line.startswith("model convnext_atto, stem 2x2") and "img/s" in line for line in cfg.recipe)
    assert cfg.epochs >= 2 and cfg.budget_min == 5

    same = auto_recipe(str(image_folder), img_size=24)  # no budget: the paper's 4x4 stem needs 32 px for 8x8
    assert same.model.patch_size == 2
    assert same.data.crop == "pad"  # sources at the training size: translate, no resized crop
    assert same.data.translate == 1 and cfg.data.translate is None  # by up to 1/16 of 24 px; rrc has no translate
    assert same.data.tta_shift == 1 and cfg.data.tta_shift == 0  # translated views at eval for padded crops only
    # Mixup/CutMix and drop path from 25 passes with padded crops, from 100 with random-resized ones
    assert same.epochs == 30 and same.data.mixup == 0.8 and same.model.drop_path_rate == 0.1
    short = auto_recipe(str(image_folder), img_size=24, epochs=24)
    assert short.data.mixup == short.data.cutmix == short.model.drop_path_rate == 0 and not short.data.randaugment
    photos = auto_recipe(str(image_folder), img_size=16, epochs=99)
    assert photos.data.crop == "rrc" and photos.data.mixup == 0 and photos.model.drop_path_rate == 0
    assert any("under 100 passes with rrc crops" in line for line in photos.recipe)


def test_auto_recipe_takes_the_finest_grid_the_budget_affords(image_folder, monkeypatch):
    """The choice of stem and model size from measured speeds (here given, so the rule itself is what is tested):
    the finest grid up to 16x16 first, the full model before the quarter one, else the finest on the smaller."""
    from convnext.train import auto

    speeds: dict[tuple[int, bool], float] = {}
    timed: list[tuple[int, bool]] = []

    def fake_speed(name, patch, size, classes, batch=128, at_least=0.0, *, device=None, **kwargs):
        timed.append((patch, bool(kwargs)))
        return speeds[(patch, bool(kwargs))]

    monkeypatch.setattr(auto, "images_per_second", fake_speed)
    slow, fast = 0.01, 1e6  # images/s: far under and far over 10 passes of the folder in a minute
    speeds.update({(2, False): slow, (2, True): fast, (4, False): fast, (4, True): fast})
    cfg = auto_recipe(str(image_folder), img_size=32, budget_min=1)  # 2x2: 16x16 tokens; 4x4: 8x8
    assert cfg.model.patch_size == 2 and cfg.model.kwargs == auto.QUARTER and timed == [(2, False), (2, True)]
    assert "quarter" in cfg.recipe[1] and "16x16 tokens" in cfg.recipe[1]
    speeds[(2, False)] = fast
    cfg = auto_recipe(str(image_folder), img_size=32, budget_min=1)
    assert cfg.model.patch_size == 2 and cfg.model.kwargs == {}
    speeds[(2, False)] = 30 * 36 / 60  # 30 passes of the 36 images a minute: under the full model's 40, so the quarter
    cfg = auto_recipe(str(image_folder), img_size=32, budget_min=1)
    assert cfg.model.patch_size == 2 and cfg.model.kwargs == auto.QUARTER
    speeds.update(dict.fromkeys(speeds, slow))
    cfg = auto_recipe(str(image_folder), img_size=32, budget_min=1)  # nothing affords it: 2x2 on the quarter
    assert cfg.model.patch_size == 2 and cfg.model.kwargs == auto.QUARTER
    speeds[(4, False)] = fast
    timed.clear()
    cfg = auto_recipe(str(image_folder), img_size=32, budget_min=1, model="convnext_atto")  # a model given: its size
    assert cfg.model.patch_size == 4 and cfg.model.kwargs == {} and timed == [(2, False), (4, False)]
    cfg = auto_recipe(str(image_folder), img_size=64, budget_min=1, patch_size=4)  # a stem given: 16x16 at 64 px
    assert cfg.model.patch_size == 4 and cfg.model.kwargs == {}


def test_auto_recipe_for_photos_and_patch_given(tmp_path):
    root = _photo_folder(tmp_path / "photos")
    cfg = auto_recipe(str(root), img_size=16, budget_min=0.2, patch_size=2)
    assert cfg.data.crop == "rrc" and cfg.data.crop_pct == 0.875
    assert any("stem 2x2" in line and "the given stem" in line for line in cfg.recipe)


def test_cli_defaults_to_auto_and_flags_win(image_folder, tmp_path, run_cli, tiny_args):
    r = run_cli("train", "--data", str(image_folder), "--output", str(tmp_path / "r"), "--img-size", "16",
                "--budget-min", "0.2", "--optim.lr", "1e-3", "--print-config")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["recipe"] and cfg["sched"]["name"] == "linear"
    assert cfg["optim"]["lr"] == 1e-3  # the flag, not the recipe's
    r = run_cli("train", "--print-config")
    assert json.loads(r.stdout)["data"]["name"] == "digits" and not json.loads(r.stdout)["recipe"]  # demo
    r = run_cli("train", "--data", str(image_folder), "--output", str(tmp_path / "r"), "--img-size", "32",
                "--budget-min", "0.01", "--model.kwargs.depths", "[1,1,1,1]", "--print-config")  # fmt: skip
    assert json.loads(r.stdout)["model"]["kwargs"] == {"depths": [1, 1, 1, 1]}  # a shape given: no quarter widths


def test_auto_run_end_to_end_then_eval_uses_flip_averaging(image_folder, tmp_path, run_cli, tiny_args):
    out = tmp_path / "run"
    r = run_cli("train", "--data", str(image_folder), "--output", str(out), "--budget-min", "0.1", "--epochs", "2",
                "--batch-size", "6", *tiny_args)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "recipe: stem" in r.stderr and "into memory" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["tta_flip"] and cfg["data"]["cache"] == "auto"
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= row["data_wait_pct"] <= 100
    r = run_cli("eval", "--checkpoint", str(out), "--data", str(image_folder), "--json")
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout.splitlines()[-1])["top1"]
    assert abs(scored - json.loads((out / "results.json").read_text())["best_top1"]) < 1e-6  # best.pt, flips


def test_fit_falls_back_to_workers_when_memory_is_short(image_folder, tiny_config, tmp_path, caplog):
    with caplog.at_level("INFO", logger="convnext.train"):
        fit(tiny_config(image_folder, tmp_path / "streamed", epochs=1, **{"data.cache_memory_share": 1e-12}))
    assert "not cached in memory" in caplog.text and "MiB needed" in caplog.text
    too_big = {"data.cache": "on", "data.cache_memory_share": 1e-12}
    with pytest.raises(ValueError, match="do not fit"):
        fit(tiny_config(image_folder, tmp_path / "on", epochs=1, **too_big))
    assert not (tmp_path / "on" / "config.json").exists()  # refused before the run folder was written


def test_patch_whitening_decorrelates_patches():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=gen)
    patches = (torch.randn(5000, 12, generator=gen) @ mix).reshape(5000, 3, 2, 2)
    w = patch_whitening(patches, 8, eps=0.0).reshape(8, 12)
    out = (patches.reshape(5000, 12) - patches.reshape(5000, 12).mean(0)) @ w.T
    cov = out.T @ out / 4999
    torch.testing.assert_close(cov[:4, :4], torch.eye(4), atol=0.05, rtol=0)  # unit variance, uncorrelated
    torch.testing.assert_close(w[4:], -w[:4])  # each filter and its negative

    conv = torch.nn.Conv2d(3, 8, 2, stride=2)
    whiten_stem(conv, torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3, samples=500)
    assert torch.all(conv.bias == 0) and conv.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="not a patchify"):
        whiten_stem(torch.nn.Conv2d(3, 8, 3, stride=1), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), (0,) * 3, (1,) * 3)

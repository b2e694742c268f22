"""fit(): the run folder, reading it back through resolve, and every failure that must stop a run with one clear
error before work."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from convnext.engine.checkpoint import load
from convnext.resolve import resolve
from convnext.train import fit


def test_run_folder_contents_and_resolving_it_back(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(image_folder, out, ema=True, ema_decay=0.9)
    result = fit(cfg)
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "results.json"):
        assert (out / name).is_file(), name
    assert result["n"] == 21  # 3 classes x 7 val images, each counted once
    assert 0 <= result["top1"] <= 100 and result["top1"] <= result["top5"]
    assert "ema_top1" in result
    from convnext.fast import kernels

    saved_result = json.loads((out / "results.json").read_text())
    assert saved_result["c_kernels"] == kernels.status()  # the run says what its CPU path ran on
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(r["val_top1"] and r["ema_top1"] and r["lr"] and r["img_per_s"] for r in rows)
    assert all(0 <= float(r["data_wait_pct"]) <= 100 for r in rows)  # the share of step time spent waiting for data

    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["classes"] == ["circle", "square", "stripe"]
    o = cfg.optim
    assert saved["optim"]["lr"] == pytest.approx(o.base_lr * 6 / o.base_batch)  # resolved: base_lr * batch / base_batch

    state = load(out / "last.pt")  # weights_only=True
    assert {"model", "ema", "optimizer", "scheduler", "rng", "epoch", "step", "config"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 2 * (36 // 6)

    last = resolve(out, which="last")
    model, cfg_dict = last.model, last.run
    assert not model.training and cfg_dict["data"]["img_size"] == 16
    torch.testing.assert_close(model.state_dict(), state["model"])
    ema_model = resolve(out, which="last", ema=True).model
    assert not torch.equal(ema_model.head.weight, model.head.weight)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_existing_run_folder_is_never_overwritten(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("precious\n")
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        fit(tiny_config(image_folder, out))
    assert (out / "metrics.csv").read_text() == "precious\n"


def test_batch_larger_than_dataset(image_folder, tiny_config, tmp_path):
    with pytest.raises(ValueError, match="batch size 64 is larger than the training set \\(36 images\\)"):
        fit(tiny_config(image_folder, tmp_path / "run", batch_size=64))
    assert not (tmp_path / "run").exists()


def test_class_mismatch_between_train_and_val(image_folder, tiny_config, tmp_path):
    shutil.rmtree(image_folder / "val" / "stripe")
    (image_folder / "val" / "zigzag").mkdir()
    shutil.copy(image_folder / "val" / "circle" / "000.png", image_folder / "val" / "zigzag" / "000.png")
    with pytest.raises(ValueError, match=r"only in train \['stripe'\], only in val \['zigzag'\]"):
        fit(tiny_config(image_folder, tmp_path / "run"))
    from convnext.train import auto_recipe

    with pytest.raises(ValueError, match=r"only in val \['zigzag'\]"):  # the recipe says so before timing a step
        auto_recipe(str(image_folder), budget_min=1)


def test_val_without_a_class_is_scored_on_the_others(image_folder, tiny_config, tmp_path, caplog):
    """A val folder with no images of a rare class: trained on all three, scored on the two it has, as eval does."""
    from convnext.infer import run_eval
    from convnext.resolve import resolve

    shutil.rmtree(image_folder / "val" / "square")
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="convnext"):
        result = fit(tiny_config(image_folder, out, epochs=1))
    assert "val has no images of 1 of the 3 classes (square); scored on the others" in caplog.text
    assert result["n"] == 14  # 2 classes x 7 val images
    assert json.loads((out / "config.json").read_text())["data"]["classes"] == ["circle", "square", "stripe"]
    model = resolve(out, which="last").model
    assert model.head.out_features == 3
    loaded = resolve(str(out / "last.pt"))
    summary = run_eval(loaded, image_folder)
    assert summary["n"] == 14 and summary["per_class_accuracy"]["square"] is None
    assert summary["top1"] == pytest.approx(result["top1"])  # the same images, labels and model as the last epoch


def test_empty_dataset(tmp_path, tiny_config):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in .*train"):
        fit(tiny_config(tmp_path / "empty", tmp_path / "run"))


def test_corrupt_image_names_the_file_or_is_skipped(image_folder, tiny_config, tmp_path):
    bad = image_folder / "train" / "square" / "005.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image .*005.png"):
        fit(tiny_config(image_folder, tmp_path / "run", epochs=1))
    out = tmp_path / "run2"
    fit(tiny_config(image_folder, out, epochs=1, **{"data.skip_bad_images": True}))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["skipped_images"] == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(image_folder, out, epochs=3, ckpt_every_steps=1, **{"optim.lr": 1e30, "sched.warmup_epochs": 0})
    with pytest.raises(RuntimeError, match=r"loss is (nan|inf).*last.pt holds step \d+'s weights \(largest \|w\|"):
        fit(cfg)
    state = load(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_from_another_model_is_refused(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(image_folder, out, epochs=1))
    cfg = tiny_config(image_folder, out, epochs=2, resume=str(out))
    cfg.model.kwargs = {"depths": [1, 1, 2, 1], "dims": [8, 16, 32, 72]}
    with pytest.raises(ValueError, match="from another model"):
        fit(cfg)


def test_start_from_checkpoint_of_another_model_is_refused(image_folder, tiny_config, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"stem.0.weight": torch.zeros(5, 3, 2, 2)}}, wrong)
    cfg = tiny_config(image_folder, tmp_path / "run", **{"model.checkpoint": str(wrong)})
    with pytest.raises((ValueError, KeyError, RuntimeError)):
        fit(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_budget_stops_training_and_still_evaluates(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_config(image_folder, out, epochs=50, budget_min=1e-9))  # gone after the first step
    assert result["steps"] == 1 and result["n"] == 21
    assert load(out / "last.pt")["step"] == 1


def test_demo_preset_smoke(tmp_path):
    """The README's first command, shortened: the digits preset trains and reports top-1 on the held-out 20%."""
    from convnext.train import apply_overrides, get_preset

    cfg = apply_overrides(get_preset("demo"), {"output": str(tmp_path / "demo"), "epochs": 1, "threads": 1})
    cfg.model.kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}  # the preset's data and recipe, a tiny net
    result = fit(cfg)
    assert result["n"] == 360 and result["top1"] > 10.0  # better than chance after one epoch
    assert Path(result["run_dir"], "best.pt").is_file()


def test_gradient_accumulation_matches_full_batch(image_folder, tiny_config, tmp_path):
    """2 micro-batches of 3 accumulate to the same update as one batch of 6 (no batch-level randomness)."""
    common = {"epochs": 1, "data.mixup": 0.0, "data.cutmix": 0.0, "model.drop_path_rate": 0.0}
    fit(tiny_config(image_folder, tmp_path / "full", **common))
    fit(tiny_config(image_folder, tmp_path / "accum", accum_steps=2, **common))
    a, b = load(tmp_path / "full" / "last.pt")["model"], load(tmp_path / "accum" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_fast_cpu_path_trains_the_same_weights(image_folder, tiny_config, tmp_path):
    """`fast` (the default on CPU) runs the blocks through convnext.fast's kernels: the same updates as plain."""
    common = {"epochs": 1, "data.mixup": 0.0, "data.cutmix": 0.0}
    fit(tiny_config(image_folder, tmp_path / "fast", fast=True, **common))
    fit(tiny_config(image_folder, tmp_path / "plain", fast=False, **common))
    a, b = load(tmp_path / "fast" / "last.pt")["model"], load(tmp_path / "plain" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_channels_last_tensorboard(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_config(image_folder, out, epochs=1, amp="bf16", channels_last=True, tensorboard=True))
    assert result["n"] == 21 and any((out / "tb").iterdir())


def test_resume_a_finished_run_for_more_epochs(image_folder, tiny_config, tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    fit(tiny_config(image_folder, out, epochs=1))
    with caplog.at_level(logging.INFO, logger="convnext.train"):
        result = fit(tiny_config(image_folder, out, epochs=2, resume=str(out)))
    assert "the run had 1 epochs, now 2: the lr schedule is the one for 2 epochs from step 6 on" in caplog.text
    assert result["steps"] == 12 and load(out / "last.pt")["epoch"] == 2
    assert [int(r["epoch"]) for r in csv.DictReader((out / "metrics.csv").open())] == [1, 2]

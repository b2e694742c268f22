"""pretrain(): the run folder, exact resume, the budget, every bad input refused in one line before any work, and
the run's encoder starting `convnext train` and a detection backbone."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from PIL import Image

from convnext.cli import main
from convnext.engine import checkpoint as ckpt
from convnext.engine.checkpoint import load
from convnext.pretrain import load_encoder, pretrain
from convnext.train.finetune import LAYER_DECAY


def test_run_folder_metrics_pictures_and_checkpoint(folder, tiny, tmp_path):
    out = tmp_path / "run"
    result = pretrain(tiny(folder, out))
    assert result["grid"] == [4, 4] and result["patch_px"] == 8 and result["visible_patches"] == 6
    assert result["fast_path"] == "on" and 0 < result["loss"] < 10 and result["epochs"] == 2
    for name in ("config.json", "last.pt", "metrics.csv", "metrics.jsonl", "results.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(r["train_loss"] and r["val_loss"] for r in rows)
    for epoch in (1, 2):
        with Image.open(out / "reconstructions" / f"epoch_{epoch:03d}.png") as im:
            assert im.width > im.height > 0  # 3 rows x 8 images
    saved = json.loads((out / "config.json").read_text())
    assert saved["fcmae"] == {"mask_ratio": 0.6, "decoder_dim": 32, "decoder_depth": 1, "norm_pix_loss": True}
    assert saved["model"]["patch_size"] == 1 and saved["data"]["img_size"] == 32
    state = load(out / "last.pt")  # weights_only=True
    assert state["epoch"] == 2 and state["step"] == 6 and "mask_token" in state["model"]
    encoder, cfg = load_encoder(out)
    assert torch.equal(encoder.stem[0].weight, state["model"]["encoder.stem.0.weight"])
    assert cfg["fcmae"]["decoder_dim"] == 32


def test_crash_mid_epoch_then_resume_matches_uninterrupted(folder, tiny, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain(tiny(folder, full, ckpt_every_steps=1, **{"model.drop_path_rate": 0.2}))
    saves, real = [], ckpt.save_atomic

    def crash_after_four(obj, path):
        real(obj, path)
        saves.append(obj["step"])
        if len(saves) == 4:  # epoch 2, step 1 of 3
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_atomic", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(folder, cut, ckpt_every_steps=1, **{"model.drop_path_rate": 0.2}))
    monkeypatch.setattr(ckpt, "save_atomic", real)
    state = load(cut / "last.pt")
    assert state["epoch"] == 1 and state["epoch_step"] == 1
    cfg = tiny(folder, cut, ckpt_every_steps=1, **{"model.drop_path_rate": 0.2})
    cfg.resume = str(cut)
    pretrain(cfg)
    a, b = load(full / "last.pt"), load(cut / "last.pt")
    assert a["step"] == b["step"] == 6
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    rows_a = (full / "metrics.csv").read_text().splitlines()
    rows_b = (cut / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in rows_a] == [r.split(",")[:5] for r in rows_b]  # epoch, step, lr, both losses


def test_per_image_loading_path(folder, tiny, tmp_path):
    """data.cache off: a seeded per-image dataset behind a DataLoader, as for data larger than memory."""
    result = pretrain(tiny(folder, tmp_path / "run", epochs=1, **{"data.cache": "off"}))
    assert result["steps"] == 3 and 0 < result["loss"] < 10


def test_budget_stops_and_still_scores(folder, tiny, tmp_path):
    result = pretrain(tiny(folder, tmp_path / "run", epochs=500, budget_min=0.002))
    assert result["epochs"] < 500 and result["loss"] > 0
    assert result["train_s"] < 5


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        ("empty", {}, "no images in"),
        ("small", {}, "6px on the short side, smaller than the 8px masking patch"),
        ("fine", {"data.img_size": 36}, "36x36 input is not tiled by the 8px masking patches.*32 or 40"),
        ("fine", {"fcmae.mask_ratio": 1.5}, "mask ratio must be in"),
        ("fine", {"model.name": "roadmap_00_resnet50"}, "pre-trains a ConvNeXt"),
    ],
)
def test_bad_input_is_refused_before_any_work(setup, overrides, message, tmp_path, tiny, write_folder):
    data = tmp_path / "data"
    if setup == "empty":
        (data / "train" / "a").mkdir(parents=True)
    else:
        write_folder(data, side=6 if setup == "small" else 32, train=4, val=2)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        pretrain(tiny(data, out, **overrides))
    assert not out.exists()


def test_unreadable_image_is_named_or_skipped(folder, tiny, tmp_path):
    bad = folder / "train" / "a" / "999.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        pretrain(tiny(folder, tmp_path / "run"))
    result = pretrain(tiny(folder, tmp_path / "run2", **{"data.skip_bad_images": True}))
    rows = list(csv.DictReader((tmp_path / "run2" / "metrics.csv").open()))
    assert result["steps"] == 6 and rows[0]["skipped_images"] == "1"


def test_cli_one_line_errors_and_print_config(folder, tmp_path, tiny_args, capsys):
    out = str(tmp_path / "r")
    assert main(["pretrain", "--data", str(folder), "--output", out, *tiny_args, "--img-size", "36"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convnext pretrain: error: a 36x36 input is not tiled")
    assert main(["pretrain", "--data", str(folder), "--mask-ratio", "0.75", "--print-config", *tiny_args]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["fcmae"]["mask_ratio"] == 0.75 and cfg["batch_size"] == 8 and cfg["optim"]["betas"] == [0.9, 0.95]


def test_a_gpu_run_defaults_to_bf16_and_a_flag_wins(folder, tiny_args, capsys, monkeypatch):
    """On a GPU with bf16, pre-training takes bf16 autocast as `convnext train`'s recipe does; `--amp` overrides it
    (only the config is resolved here: no GPU is touched)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: True)
    base = ["pretrain", "--data", str(folder), "--print-config", *tiny_args]
    assert main([*base, "--device", "cuda"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["amp"] == "bf16" and any("mixed precision bf16" in line for line in cfg["recipe"])
    assert main([*base, "--device", "cuda", "--amp", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["amp"] == "none"
    assert main([*base, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["amp"] == "none"


def test_pretrain_run_starts_train_and_a_detection_backbone(folder, tmp_path, tiny_args, caplog):
    run = tmp_path / "pre"
    assert main(["pretrain", "--data", str(folder), "--output", str(run), "--epochs", "1", *tiny_args]) == 0
    ft = tmp_path / "ft"
    args = ["train", "--data", str(folder), "--output", str(ft), "--pretrained-run", str(run), "--epochs", "1",
            "--batch-size", "8", "--img-size", "32", "--threads", "1", "--data.num_workers", "0"]  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="the model keeps its fresh ones"):
        assert main(args) == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("an FCMAE checkpoint: loading its encoder; dropped the decoder" in line for line in said)
    saved = json.loads((ft / "config.json").read_text())
    assert saved["model"]["checkpoint"] == str(run) and saved["model"]["patch_size"] == 1
    assert saved["model"]["kwargs"]["dims"] == [8, 16, 32, 64]
    pre_cfg = json.loads((run / "config.json").read_text())
    assert saved["data"]["mean"] == pre_cfg["data"]["mean"]
    assert saved["optim"]["layer_decay"] == LAYER_DECAY["fcmae"]  # the automatic fine-tune's FCMAE settings
    assert main(["train", "--data", str(folder), "--pretrained-run", str(run), "--model", "convnext_tiny"]) == 2

    from convnext.dense.backbone import load_model
    from convnext.dense.config import BackboneConfig

    bcfg = BackboneConfig(model="convnextv2_atto", pretrained_run=str(run), patch_size=4)
    backbone = load_model(bcfg)
    assert backbone.stem[0].kernel_size == (4, 4) and bcfg.mean == tuple(pre_cfg["data"]["mean"])

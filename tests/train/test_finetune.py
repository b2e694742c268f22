"""Weights mean weights in `convnext train`: a published tag, `--pretrained`, a weight file in any layout, a run folder
or a pretrained folder start the run from those weights, and with no preset the automatic recipe fine-tunes them
(an FCMAE pre-training run with its own settings, whether given as --model or --pretrained-run); weights that cannot
be read are one error before any work."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from convnext.cli import main
from convnext.registry import create_model
from convnext.train.config import ModelConfig
from convnext.train.finetune import LAYER_DECAY, LR_AT_128, UP_EPOCHS
from convnext.train.runs import build_model
from convnext.train.start import starting_weights
from convnext.weights import WEIGHTS, WeightSpec

SHAPE = {"depths": (1, 1, 2, 1), "dims": (8, 16, 32, 64), "patch_size": 2}


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A published spec whose file is already in the download cache (no network here)."""
    spec = WeightSpec("convnext_atto", "local_test", "http://127.0.0.1:9/never.pth", None, "ours", num_classes=5,
                      input_size=24, mean=(0.3, 0.4, 0.5), std=(0.2, 0.2, 0.2),
                      model_kwargs=tuple(SHAPE.items()))  # fmt: skip
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "weights").mkdir(parents=True)
    torch.manual_seed(1)
    net = create_model("convnext_atto", num_classes=5, **SHAPE)
    torch.save(net.state_dict(), tmp_path / "home" / "weights" / spec.filename)
    return spec, net


@pytest.fixture
def fcmae_run(image_folder, tmp_path):
    """A `convnext pretrain` run folder: one epoch of FCMAE on the image folder, a ConvNeXt V2 of widths 8..64 with a
    1x1 stem at 32 px."""
    run = tmp_path / "fcmae"
    assert main(["pretrain", "--data", str(image_folder), "--output", str(run), "--epochs", "1", "--model.kwargs",
                 '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}', "--img-size", "32", "--model.patch_size", "1",
                 "--batch-size", "8", "--data.num_workers", "0", "--data.eval_images", "8", "--fcmae.decoder_dim",
                 "32", "--threads", "1", "--device", "cpu"]) == 0  # fmt: skip
    return run


def test_a_published_tag_starts_from_its_weights_with_a_new_head(published):
    spec, net = published
    model = build_model(ModelConfig(name=spec.name, kwargs=dict(SHAPE)), num_classes=3)  # the tag alone: its weights
    w = "stages.3.blocks.0.pwconv2.weight"
    assert torch.equal(model.state_dict()[w], net.state_dict()[w])
    assert model.head.out_features == 3 and model.training


def test_auto_recipe_fine_tunes_a_tag_with_its_normalisation(published, image_folder, tmp_path, capsys):
    spec, _ = published
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--model", spec.name, "--epochs", "1", "--output", str(out),
                 "--print-config"]) == 0  # fmt: skip
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["name"] == spec.name and cfg["model"]["pretrained"] is True
    assert cfg["model"]["stem_init"] == "default" and cfg["optim"]["name"] == "adamw"
    assert cfg["data"]["mean"] == [0.3, 0.4, 0.5] and cfg["data"]["img_size"] == 24  # the weights' own
    assert any(line.startswith("model: fine-tuning convnext_atto from") and "a new 3-class head" in line
               and "5-class head dropped" in line for line in cfg["recipe"])  # fmt: skip
    assert not out.exists()


def test_images_larger_than_the_weights_train_at_their_own_size_where_the_budget_affords_it(
    published, image_folder, tmp_path, monkeypatch, capsys
):
    """Weights trained at 16 px on 24 px images: the data's own 24 px without a budget or with one that buys
    `UP_EPOCHS` passes there (padded crops, as the images are the training size), the weights' 16 px with one that
    does not; an explicit --img-size wins."""
    spec, _ = published
    monkeypatch.setitem(WEIGHTS, spec.name, replace(spec, input_size=16))
    base = ["train", "--data", str(image_folder), "--model", spec.name, "--output", str(tmp_path / "run"),
            "--threads", "1", "--print-config"]  # fmt: skip

    def config(*flags: str) -> dict:
        assert main([*base, *flags]) == 0
        return json.loads(capsys.readouterr().out)

    for flags in (["--epochs", "2"], ["--budget-min", "1000"]):
        cfg = config(*flags)
        assert cfg["data"]["img_size"] == 24 and cfg["data"]["crop"] == "pad", flags
        assert any(line.startswith("size 24px, the data's own") and "weights' 16px" in line for line in cfg["recipe"])
    cfg = config("--budget-min", "1e-5")  # a few images' worth of time: under UP_EPOCHS passes at 24 px
    assert cfg["data"]["img_size"] == 16 and cfg["data"]["crop"] == "rrc"
    assert any(
        line.startswith("size 16px: the weights' own") and f"under {UP_EPOCHS}" in line for line in cfg["recipe"]
    )
    assert config("--epochs", "2", "--img-size", "16")["data"]["img_size"] == 16
    assert not (tmp_path / "run").exists()


def test_a_tag_that_cannot_be_fetched_is_one_error_naming_the_cache(image_folder, tmp_path, monkeypatch, capsys):
    spec = WeightSpec("convnext_atto", "nowhere", "http://127.0.0.1:9/never.pth", None, "ours")
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_folder), "--model", spec.name, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "home") in err and "could not be fetched" in err and "Traceback" not in err
    assert not out.exists()


def test_weights_of_another_architecture_are_one_error_before_any_work(image_folder, tmp_path, capsys):
    path = tmp_path / "atto.pth"
    torch.save(create_model("convnext_atto", num_classes=3).state_dict(), path)
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--model", "convnext_femto", "--model.checkpoint", str(path),
            "--output", str(out)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "atto.pth" in err and "Traceback" not in err and not out.exists()
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    assert main(args) == 2
    assert "atto.pth" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_fine_tuning_from_its_own_run_starts_where_it_left_off_in_every_layout(tmp_path, capsys):
    """One epoch from weights trained on the same data scores within a point of them, whichever layout they come in
    (our run folder, its best.pt, timm's .pth, .safetensors, a pretrained folder)."""
    src = tmp_path / "src"  # the automatic recipe, as a user's first run on the folder
    assert main(["train", "--preset", "auto", "--data", "digits", "--epochs", "6", "--threads", "2", "--output",
                 str(src)]) == 0  # fmt: skip
    source = json.loads((src / "results.json").read_text())
    files = {"timm.pth": ["--to", "timm"], "ours.safetensors": [], "hf": ["--to", "hf"]}
    for name, flags in files.items():
        assert main(["convert", str(src / "best.pt"), str(tmp_path / name), *flags]) == 0
    layouts = {
        "run": ["--model", str(src)],
        "best.pt": ["--model", "convnext_atto", "--model.checkpoint", str(src / "best.pt")],
        "timm.pth": ["--model", "convnext_atto", "--model.checkpoint", str(tmp_path / "timm.pth")],
        "safetensors": ["--model", "convnext_atto", "--model.checkpoint", str(tmp_path / "ours.safetensors")],
        "hf": ["--model", str(tmp_path / "hf")],
    }
    for layout, flags in layouts.items():
        out = tmp_path / f"ft-{layout}"
        assert main(["train", "--preset", "auto", "--data", "digits", *flags, "--epochs", "1", "--threads", "2",
                     "--output", str(out)]) == 0, layout  # fmt: skip
        capsys.readouterr()
        saved = json.loads((out / "config.json").read_text())
        assert saved["model"]["stem_init"] == "default" and saved["model"]["patch_size"] == 2, layout
        assert any("its head kept" in line for line in saved["recipe"]), layout
        top1 = json.loads((out / "results.json").read_text())["top1"]
        assert top1 >= source["top1"] - 1.0, f"{layout}: {top1} after fine-tuning vs {source['top1']}"
        assert Path(out / "best.pt").is_file()


def test_pretrained_run_and_model_run_are_one_route_with_the_fcmae_settings(fcmae_run, image_folder, capsys):
    """`--pretrained-run RUN` is `--model RUN`: the same config, with or without a preset; with none, the automatic
    fine-tune takes the FCMAE encoder's own lr and layer-wise decay and says so."""
    base = ["train", "--data", str(image_folder), "--epochs", "3", "--print-config"]
    for preset in ([], ["--preset", "finetune"]):
        configs = []
        for flag in ("--pretrained-run", "--model"):
            assert main([*base, *preset, flag, str(fcmae_run)]) == 0
            configs.append(json.loads(capsys.readouterr().out))
        assert configs[0] == configs[1], preset
        cfg = configs[0]
        assert cfg["model"]["name"] == "convnextv2_atto" and cfg["model"]["checkpoint"] == str(fcmae_run)
        assert cfg["model"]["patch_size"] == 1 and cfg["model"]["kwargs"]["dims"] == [8, 16, 32, 64]
        assert cfg["model"]["stem_init"] == "default"
    auto = json.loads((fcmae_run / "config.json").read_text())
    assert main([*base, "--model", str(fcmae_run)]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"]["mean"] == auto["data"]["mean"] and cfg["data"]["img_size"] == 32  # the run's own
    batch = cfg["batch_size"]
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["layer_decay"] == LAYER_DECAY["fcmae"]
    assert cfg["optim"]["lr"] == pytest.approx(LR_AT_128["fcmae"] * (batch / 128) ** 0.5)
    lines = cfg["recipe"]
    assert any(line.startswith("model: fine-tuning convnextv2_atto from pre-training run") and "a new 3-class head"
               in line for line in lines)  # fmt: skip
    assert any(line.startswith("AdamW") and "an FCMAE encoder" in line for line in lines)


def test_an_fcmae_file_is_told_from_a_supervised_one(fcmae_run, tmp_path):
    """The FCMAE settings follow the weights, not the flag: a pre-training run's last.pt given as a file is an FCMAE
    encoder; a supervised model's weights are not."""
    assert starting_weights(None, checkpoint=str(fcmae_run / "last.pt")).fcmae
    assert starting_weights(str(fcmae_run)).fcmae
    path = tmp_path / "atto.pth"
    torch.save(create_model("convnext_atto", num_classes=3).state_dict(), path)
    assert not starting_weights("convnext_atto", checkpoint=str(path)).fcmae


def test_pretrained_run_bad_input_is_one_error_before_any_work(fcmae_run, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(image_folder), "--output", str(out)]
    assert main([*base, "--pretrained-run", str(fcmae_run), "--model", "convnext_tiny"]) == 2
    assert f"{fcmae_run} holds a convnextv2_atto" in capsys.readouterr().err
    assert main(["train", "--pretrained-run", str(fcmae_run), "--resume", str(fcmae_run)]) == 2
    assert "--resume continues one" in capsys.readouterr().err
    assert main([*base, "--pretrained-run", str(image_folder)]) == 2  # not a pre-training run
    assert "is not a `convnext pretrain` run folder" in capsys.readouterr().err
    assert not out.exists()

"""Weights mean weights in `convnext train`: a published tag, `--pretrained`, a weight file in any layout, a run folder
or a pretrained folder start the run from those weights, and with no preset the automatic recipe fine-tunes them;
weights that cannot be read are one error before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convnext.cli import main
from convnext.registry import create_model
from convnext.train.config import ModelConfig
from convnext.train.runs import build_model
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

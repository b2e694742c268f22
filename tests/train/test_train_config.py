"""Presets carry the paper's numbers; any field is overridable from the command line; configs round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from convnext.cli import main
from convnext.config import apply_overrides, from_dict
from convnext.engine.optim import scaled_lr
from convnext.registry import MODELS
from convnext.train import PRESETS, TrainConfig, get_preset
from convnext.train.config import resolve_preprocessing
from convnext.weights.specs import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN


@pytest.mark.parametrize("size,dp", [("tiny", 0.1), ("small", 0.4), ("base", 0.5), ("large", 0.5)])
def test_in1k_presets_are_the_papers_recipe(size, dp):
    c = get_preset(f"in1k_{size}")
    assert c.model.name == f"convnext_{size}" and c.model.drop_path_rate == dp
    assert (c.epochs, c.batch_size, c.sched.warmup_epochs, c.sched.name, c.sched.min_lr) == (
        300,
        4096,
        20,
        "cosine",
        1e-6,
    )
    assert (c.optim.name, c.optim.base_lr, c.optim.base_batch, c.optim.weight_decay) == ("adamw", 4e-3, 4096, 0.05)
    assert (c.optim.betas, c.optim.eps, c.optim.layer_decay) == ((0.9, 0.999), 1e-8, None)
    d = c.data
    assert (d.randaugment, d.ra_num_ops, d.ra_magnitude, d.ra_magnitude_std) == (True, 2, 9, 0.5)
    assert (d.mixup, d.cutmix, d.switch_prob, d.mix_prob, d.re_prob, d.label_smoothing) == (
        0.8,
        1.0,
        0.5,
        1.0,
        0.25,
        0.1,
    )
    assert (d.img_size, d.crop_pct, d.scale, d.hflip) == (224, 0.875, (0.08, 1.0), 0.5)
    assert (c.ema, c.ema_decay) == (True, 0.9999)
    assert scaled_lr(c.optim.base_lr, 1024, c.optim.base_batch) == pytest.approx(1e-3)  # other batches scale


def test_isotropic_presets():
    assert get_preset("in1k_isotropic_small").model.drop_path_rate == 0.1
    assert get_preset("in1k_isotropic_base").model.drop_path_rate == 0.2
    large = get_preset("in1k_isotropic_large")
    assert large.model.drop_path_rate == 0.5 and large.model.layer_scale_init == 1e-6


def test_in22k_finetune_preset():
    c = get_preset("in22k_ft_in1k", "convnext_large")
    assert (c.epochs, c.batch_size, c.optim.base_lr, c.optim.base_batch) == (30, 512, 5e-5, 512)
    assert (c.sched.warmup_epochs, c.optim.weight_decay, c.optim.layer_decay, c.model.head_init_scale) == (
        0,
        1e-8,
        0.8,
        0.001,
    )
    assert (c.data.mixup, c.data.cutmix, c.model.drop_path_rate, c.ema) == (0.0, 0.0, 0.3, False)
    assert (
        get_preset("in22k_ft_in1k", "convnext_xlarge").ema and get_preset("in22k_ft_in1k").model.drop_path_rate == 0.2
    )


def test_small_data_presets():
    ft = get_preset("finetune")
    assert ft.model.pretrained and ft.optim.layer_decay == 0.7 and ft.data.mixup == 0.0
    c10 = get_preset("cifar10")
    assert c10.data.img_size == 32 and c10.model.patch_size in (1, 2) and c10.data.name == "cifar10"
    demo = get_preset("demo")
    assert demo.data.name == "digits" and demo.data.hflip == 0.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_names_a_registered_model_and_round_trips(name):
    c = get_preset(name)
    assert c.model.name.split(".")[0] in MODELS
    assert from_dict(json.loads(json.dumps(c.to_dict())), TrainConfig) == c


def test_overrides_parse_to_field_types():
    args = ["--optim.lr", "1e-3", "--data.scale", "0.5,1", "--ema", "false", "--budget_min=2.5"]
    args += ["--data.mean=[0.1,0.2,0.3]", "--model.kwargs.depths", "[1,1,1,1]", "--optim.clip_grad", "none"]
    args += ["--sched.name", "step", "--epochs", "3", "--model.drop_path_rate", "0.1", "--data.data_dir", "/tmp/x"]
    c = apply_overrides(get_preset("demo"), args)
    assert c.optim.lr == 1e-3 and c.data.scale == (0.5, 1.0) and c.ema is False and c.budget_min == 2.5
    assert c.data.mean == (0.1, 0.2, 0.3) and c.model.kwargs == {"depths": [1, 1, 1, 1]}
    assert c.optim.clip_grad is None and c.sched.name == "step" and c.epochs == 3 and c.data.data_dir == "/tmp/x"
    assert c.model.build_kwargs() == {"drop_path_rate": 0.1, "patch_size": 2, "depths": [1, 1, 1, 1]}
    with pytest.raises(ValueError, match="unknown config field 'optim.learning_rate'"):
        apply_overrides(TrainConfig(), ["--optim.learning_rate", "1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(TrainConfig(), ["--epochs", "many"])
    with pytest.raises(ValueError, match="needs a value"):
        apply_overrides(TrainConfig(), ["--optim.lr"])


def test_cli_resolves_preset_flags_and_overrides(capsys):
    argv = ["train", "--preset", "cifar10", "--model", "convnext_femto", "--data", "cifar100", "--epochs", "3",
            "--batch-size", "128", "--img-size", "32", "--seed", "7", "--skip-bad-images", "--optim.lr", "1e-3",
            "--data.mixup", "0.2", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["name"] == "convnext_femto" and cfg["data"]["name"] == "cifar100"
    assert (cfg["epochs"], cfg["batch_size"], cfg["seed"], cfg["optim"]["lr"]) == (3, 128, 7, 1e-3)
    assert cfg["data"]["skip_bad_images"] is True and cfg["data"]["mixup"] == 0.2
    assert main(["train", "--preset", "demo", "--optim.nope", "1", "--print-config"]) == 2
    assert "unknown config field 'optim.nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "nope", "--print-config"]) == 2


def test_config_file_json_or_yaml_then_flags_override_it(tmp_path, capsys):
    """--config takes nested sections (a run's config.json) or dotted keys, and a preset; flags win over it."""
    given = {"preset": "cifar10", "epochs": 4, "optim": {"lr": 2e-3}, "data.mixup": 0.1,
             "model": {"kwargs": {"depths": [1, 1, 1, 1]}}}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(given))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--epochs", "2", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["epochs"] == 2 and cfg["optim"]["lr"] == 2e-3 and cfg["data"]["mixup"] == 0.1
    assert cfg["model"]["kwargs"] == {"depths": [1, 1, 1, 1]} and cfg["data"]["img_size"] == 32  # the preset's
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("preset: demo\nsched:\n  name: linear\nseed: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["sched"]["name"] == "linear" and cfg["seed"] == 3


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ('{"optim": {"nope": 1}}', ".json", "c.json: unknown config field 'optim.nope'"),
        ('{"epochs": "three"}', ".json", "c.json: epochs: expected an integer, got 'three'"),
        ("{not json", ".json", "c.json: not valid JSON"),
        ("[1, 2]", ".json", "expected a mapping of config fields, got list"),
        ("epochs: 1", ".toml", "give a .json, .yaml or .yml file"),
    ],
)
def test_bad_config_file_is_one_line_naming_file_and_field(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--preset", "demo", "--print-config"]) == 2
    assert message in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--print-config"]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- the weights' preprocessing when fine-tuning


def test_fine_tuning_takes_the_weights_mean_std_and_resize_unless_given():
    clip = get_preset("finetune", "convnext_base.clip_laion2b_augreg_ft_in1k")
    assert clip.data.mean is None  # not chosen yet: the weights decide when the run starts
    (why,) = resolve_preprocessing(clip)
    assert (clip.data.mean, clip.data.std, clip.data.interpolation) == (CLIP_MEAN, CLIP_STD, "bicubic")
    assert why.startswith("data: mean, std, interpolation of convnext_base.clip_laion2b_augreg_ft_in1k")
    tv = get_preset("finetune", "convnext_tiny.tv_in1k")
    resolve_preprocessing(tv)
    assert tv.data.interpolation == "bilinear" and tv.data.mean == IMAGENET_MEAN  # torchvision's eval resize
    given = apply_overrides(
        get_preset("finetune", "convnext_base.clip_laion2b_augreg_ft_in1k"), ["--data.mean", "0.5,0.5,0.5"]
    )
    why = resolve_preprocessing(given)
    assert given.data.mean == (0.5, 0.5, 0.5) and given.data.std == CLIP_STD
    assert why[-1] == "data: mean as given, not as convnext_base.clip_laion2b_augreg_ft_in1k was trained"
    scratch = get_preset("in1k_tiny")  # from scratch: ImageNet's statistics, bicubic, nothing to report
    assert resolve_preprocessing(scratch) == []
    assert (scratch.data.mean, scratch.data.interpolation) == (IMAGENET_MEAN, "bicubic")
    own = get_preset("cifar10")  # a preset's own statistics stay
    resolve_preprocessing(own)
    assert own.data.mean == (0.4914, 0.4822, 0.4465)


def test_fine_tuning_run_normalises_and_evaluates_as_its_weights(image_folder, tiny_config, tmp_path, monkeypatch):
    """`--model NAME.TAG` with pretrained weights (here already in the download cache): config.json and the recipe
    lines record the weights' mean, std and eval resize, and evaluation uses them."""
    from convnext.registry import create_model
    from convnext.resolve import resolve
    from convnext.train import fit
    from convnext.weights import WEIGHTS, WeightSpec

    shape = {"depths": (1, 1, 2, 1), "dims": (8, 16, 32, 64), "patch_size": 2}
    spec = WeightSpec("convnext_atto", "local_test", "https://example.invalid/w.pth", None, "ours", num_classes=3,
                      mean=(0.3, 0.4, 0.5), std=(0.2, 0.2, 0.2), interpolation="bilinear",
                      model_kwargs=tuple(shape.items()))  # fmt: skip
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "weights").mkdir(parents=True)
    torch.save(
        create_model("convnext_atto", num_classes=3, **shape).state_dict(),
        tmp_path / "home" / "weights" / spec.filename,
    )
    cfg = tiny_config(
        image_folder, tmp_path / "run", **{"model.name": spec.name, "model.pretrained": True, "epochs": 1}
    )
    cfg.data.mean = cfg.data.std = None  # the demo preset's own 0.5s would win: leave them to the weights
    result = fit(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["mean"] == [0.3, 0.4, 0.5] and saved["data"]["std"] == [0.2, 0.2, 0.2]
    assert saved["data"]["interpolation"] == "bilinear"
    assert any(
        line.startswith("data: mean, std, interpolation of convnext_atto.local_test") for line in saved["recipe"]
    )
    pre = resolve(str(tmp_path / "run")).preprocess  # the run evaluates as it was trained
    assert (pre.mean, pre.interpolation) == ((0.3, 0.4, 0.5), "bilinear") and result["n"] > 0

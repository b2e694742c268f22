"""`resolve`, one kind of source at a time, each made for real in tmp_path: the model it gives computes what the saved
weights compute, and its preprocessing, classes and provenance are the source's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from convnext.constants import IMAGENET_STD, imagenet_classes
from convnext.engine import checkpoint
from convnext.engine.ema import ema_weights
from convnext.publish import pretrained_files, write_folder
from convnext.registry import create_model
from convnext.resolve import Preprocess, Resolved, is_pretrain_run, is_run_dir, resolve
from convnext.weights import WEIGHTS, WeightSpec, from_ours, save_weights

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def randomized(name: str = "convnext_atto", seed: int = 0, **kw) -> nn.Module:
    """A model with weights far from their init (layer scale and norms included), in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.5))
    return model.eval()


def same_outputs(got: nn.Module, want: nn.Module, x: torch.Tensor = X) -> None:
    with torch.no_grad():
        a, b = got(x), want.eval()(x)
    assert b.abs().max() > 0.01
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- names


def test_a_registered_name_is_random_weights_said_so():
    r = resolve("convnext_atto")
    assert r.random and "random weights" in r.provenance and not r.model.training
    assert (r.name, r.arch, r.preprocess, r.classes) == ("convnext_atto", "convnext_atto", Preprocess(),
                                                          imagenet_classes())  # fmt: skip
    assert r.label(3) == imagenet_classes()[3]
    small = resolve("convnext_atto", num_classes=4)
    assert small.model.num_classes == 4 and small.classes is None and small.label(3) == "3"
    with pytest.raises(KeyError, match="unknown model"):
        resolve("convnext_nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['drop_pth'\]"):
        resolve("convnext_atto", drop_pth=0.1)


def test_arch_tag_gives_the_published_weights_through_the_download_cache(monkeypatch, tmp_path):
    src = randomized(num_classes=10, **SMALL)
    spec = WeightSpec("convnext_atto", "local_test", "https://example.invalid/w.pth", None, "timm", num_classes=10,
                      input_size=32, test_input_size=48, test_crop_pct=1.0, mean=(0.1, 0.2, 0.3),
                      interpolation="bilinear", model_kwargs=tuple(SMALL.items()))  # fmt: skip
    monkeypatch.setitem(WEIGHTS, spec.name, spec)
    monkeypatch.setenv("CONVNEXT_HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    torch.save({"state_dict": from_ours(src.state_dict(), "timm")}, tmp_path / "weights" / spec.filename)
    r = resolve(spec.name)
    same_outputs(r.model, src)
    assert not r.random and spec.name in r.provenance and spec.url in r.provenance
    assert r.preprocess == Preprocess(48, 1.0, (0.1, 0.2, 0.3), IMAGENET_STD, interpolation="bilinear")  # test size
    assert resolve(spec.name, img_size=32).preprocess.crop_pct == 0.875  # a size of the user's: its own crop


# ----------------------------------------------------------------------------------------------- weight files


@pytest.mark.parametrize(
    ("layout", "file", "wrap"),
    [("ours", "w.safetensors", None), ("official", "w.pth", "model"), ("timm", "w.pth", "state_dict"),
     ("torchvision", "w.pt", None), ("hf", "w.safetensors", None)],
)  # fmt: skip
def test_a_weight_file_in_any_layout(tmp_path, layout, file, wrap):
    src = randomized(num_classes=7)  # the whole atto: the registered name fits it too
    sd = from_ours(src.state_dict(), layout)
    path = tmp_path / file
    if path.suffix == ".safetensors":
        save_weights(sd, path)
    else:
        torch.save({wrap: sd} if wrap else sd, path)
    by_shape = resolve(path)  # the architecture read off the tensors
    same_outputs(by_shape.model, src)
    assert by_shape.model.cfg == src.cfg and by_shape.arch == "convnext_atto" and by_shape.classes is None
    assert by_shape.preprocess == Preprocess() and f"({layout} layout)" in by_shape.provenance
    named = resolve(path, model="convnext_atto", drop_path_rate=0.1)  # an option the weights leave free
    same_outputs(named.model, src)
    assert (named.name, named.model.num_classes, named.model.cfg.drop_path_rate) == ("convnext_atto", 7, 0.1)


def test_a_weight_file_with_ema_and_a_new_head(tmp_path):
    main, ema = randomized(num_classes=3, seed=0, **SMALL), randomized(num_classes=3, seed=1, **SMALL)
    torch.save({"model": main.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "both.pth")
    same_outputs(resolve(tmp_path / "both.pth").model, main)
    same_outputs(resolve(tmp_path / "both.pth", ema=True).model, ema)
    with pytest.warns(UserWarning, match="dropped"):
        five = resolve(tmp_path / "both.pth", num_classes=5)
    assert five.model.num_classes == 5
    with torch.no_grad():  # the trunk is the file's, the head a fresh one
        torch.testing.assert_close(five.model.forward_features(X), main.forward_features(X))


# ----------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real (tiny) classification run on the embedded digits, with EMA; its last.pt then moved off best.pt."""
    from convnext.train import fit, get_preset

    cfg = get_preset("demo")
    out = tmp_path_factory.mktemp("run") / "run"
    model = dataclasses.replace(cfg.model, kwargs=dict(SMALL))
    cfg = dataclasses.replace(cfg, epochs=1, batch_size=256, output=str(out), ema=True, ema_decay=0.9, fast=False,
                              threads=1, device="cpu", model=model)  # fmt: skip
    fit(cfg)
    state = checkpoint.load(out / "last.pt")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save_atomic(state, out / "last.pt")
    return out


def saved(path: Path, ema: bool = False) -> nn.Module:
    """The model of a run checkpoint, built by hand from the run's own config."""
    state = checkpoint.load(path)
    model = create_model("convnext_atto", num_classes=10, patch_size=2, drop_path_rate=0.0, **SMALL)
    model.load_state_dict(ema_weights(state["ema"]) if ema else state["model"])
    return model.eval()


def test_a_classification_run_folder(run):
    r = resolve(run)
    x = torch.randn(2, 3, 16, 16)
    same_outputs(r.model, saved(run / "best.pt"), x)
    cfg = json.loads((run / "config.json").read_text())
    assert r.classes == [str(d) for d in range(10)] == cfg["data"]["classes"]
    assert r.preprocess == Preprocess(16, 1.0, (0.5,) * 3, (0.5,) * 3, interpolation=cfg["data"]["interpolation"])
    assert (r.run, r.run_dir, r.name, r.arch) == (cfg, run, "convnext_atto", "convnext_atto")
    assert "best.pt" in r.provenance and is_run_dir(run) and not is_pretrain_run(run)
    same_outputs(resolve(run, which="last").model, saved(run / "last.pt"), x)
    same_outputs(resolve(run, ema=True).model, saved(run / "best.pt", ema=True), x)
    with pytest.warns(UserWarning, match="head has 10 classes, the model 4: dropped"):
        head = resolve(run, num_classes=4, drop_path_rate=0.2)  # fine-tuning the run: a new head, stochastic depth
    assert (head.model.num_classes, head.model.cfg.drop_path_rate, head.classes) == (4, 0.2, None)


def test_a_run_checkpoint_file_says_which(run):
    x = torch.randn(2, 3, 16, 16)
    last = resolve(run / "last.pt")
    same_outputs(last.model, saved(run / "last.pt"), x)
    assert last.run_dir == run and last.classes == [str(d) for d in range(10)] and "last.pt" in last.provenance
    with torch.no_grad():
        assert not torch.allclose(last.model(x), resolve(run / "best.pt").model(x))
    with pytest.raises(ValueError, match="does not fit"):  # with a model named: read as weights, into the full atto
        resolve(run / "last.pt", model="convnext_atto")


def test_a_pretraining_run_folder_gives_its_encoder(tmp_path):
    from convnext.pretrain import PretrainConfig
    from convnext.pretrain.fcmae import FCMAE, FCMAEConfig

    cfg = PretrainConfig()
    cfg.model.kwargs, cfg.model.patch_size = {k: list(v) for k, v in SMALL.items()}, 1
    cfg.data.img_size, cfg.data.mean, cfg.data.std = 32, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3)
    encoder = randomized("convnextv2_atto", num_classes=0, patch_size=1, **SMALL)
    fcmae = FCMAE(encoder, FCMAEConfig(decoder_dim=16))
    out = tmp_path / "pre"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    checkpoint.save_atomic({"model": fcmae.state_dict(), "step": 3}, out / "last.pt")
    r = resolve(out)
    assert is_pretrain_run(out) and isinstance(r.model.norm, nn.Identity) and r.model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(r.model.forward_features(X), fcmae.encoder.eval().forward_features(X))
    assert r.preprocess == Preprocess(32, mean=(0.4,) * 3, std=(0.3,) * 3) and r.classes is None
    assert r.name == "convnextv2_atto" and "encoder" in r.provenance
    with pytest.warns(UserWarning, match="the model keeps its fresh ones"):  # fine-tuning: a new head and norm
        assert resolve(out, num_classes=6).model.num_classes == 6


# ----------------------------------------------------------------------------------------------- pretrained folders


PRE = Preprocess(40, 1.0, (0.2, 0.3, 0.4), (0.5, 0.5, 0.5), interpolation="bilinear")
CLASSES = ["ant", "bee", "cat"]


def pretrained_folder(folder: Path) -> nn.Module:
    """A folder as `convnext push --save-dir` writes it, of a small model with classes `CLASSES` and preprocessing
    `PRE`; returns the model."""
    model = randomized(num_classes=3, **SMALL)
    write_folder(folder, *pretrained_files(Resolved(model, PRE, CLASSES, "made here", "convnext_atto")))
    return model


def test_a_local_pretrained_folder(tmp_path):
    model = pretrained_folder(tmp_path / "folder")
    r = resolve(tmp_path / "folder")
    same_outputs(r.model, model)
    assert (r.preprocess, r.classes, r.run) == (PRE, CLASSES, None) and "(convnext config)" in r.provenance


def test_an_hf_hub_name_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """The repo's files in the HF cache as huggingface_hub keeps them (refs/main -> snapshots/<commit>/...), read
    offline by huggingface_hub itself."""
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--me--tiny"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = pretrained_folder(repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = resolve("hf-hub:me/tiny")
    same_outputs(r.model, model)
    assert (r.preprocess, r.classes, r.name) == (PRE, CLASSES, "hf-hub:me/tiny")
    assert str(repo / "snapshots" / commit) in r.provenance


# ----------------------------------------------------------------------------------------------- refusals


def test_what_resolve_refuses(tmp_path, run):
    with pytest.raises(ValueError, match="names its own model"):
        resolve(run, model="convnext_atto")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds config.json but no checkpoint"):
        resolve(tmp_path)
    with pytest.raises(ValueError, match="which must be"):
        resolve(run, which="middle")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="describe no ConvNeXt"):
        resolve(tmp_path / "other.pt")

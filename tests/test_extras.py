"""The light install: each optional part missing is one line naming the pip command, said before anything is
written; the digits ship as package data; the fast path turns itself off on an untested torch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from convnext import extras, fast
from convnext.cli import main
from convnext.data.datasets import DigitsDataset
from convnext.export import export_model
from convnext.registry import create_model


@pytest.fixture
def without(monkeypatch):
    """Make the named modules look uninstalled."""

    def hide(*names: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))

    return hide


def test_require_names_the_extra_and_the_pip_command(without):
    without("onnxruntime", "tensorboard")
    with pytest.raises(extras.MissingExtraError) as e:
        extras.require("onnx", "onnxruntime", "tensorboard", what="X")
    assert (
        str(e.value)
        == "X needs onnxruntime, tensorboard, which is not installed: pip install 'convnext[export,tensorboard]'"
    )
    extras.require("onnx", what="X")  # present: nothing raised


def test_onnx_export_without_the_extra_writes_nothing(without, tmp_path):
    without("onnxruntime")
    model = create_model("convnext_atto", num_classes=3).eval()
    with pytest.raises(extras.MissingExtraError, match=r"pip install 'convnext\[export\]'"):
        export_model(model, "onnx", tmp_path / "m.onnx", img_size=32)
    assert list(tmp_path.iterdir()) == []


def test_train_with_tensorboard_but_no_tensorboard_is_one_line_before_the_run_folder(without, tmp_path, capsys):
    without("tensorboard")
    out = tmp_path / "run"
    rc = main(["train", "--data", "digits", "--output", str(out), "--epochs", "1", "--tensorboard", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "pip install 'convnext[tensorboard]'" in err[0]
    assert not out.exists()


def test_packaged_digits_are_scikit_learns_with_its_split():
    sklearn = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the test extra) compares the copy")
    from sklearn.model_selection import train_test_split

    d = sklearn.load_digits()
    train, val = train_test_split(range(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    for split, idx in (("train", sorted(train)), ("val", sorted(val))):
        ds = DigitsDataset(split)
        assert ds.targets == d.target[idx].tolist()
        assert (ds.images == (d.images[idx] * (255 / 16)).round()).all()


def test_fast_path_turns_itself_off_on_an_untested_torch(monkeypatch):
    monkeypatch.setattr(fast.compiler, "TESTED_TORCH", ((99, 0), (99, 0)))  # read by usable() in its module
    monkeypatch.delenv("CONVNEXT_FAST_ANY_TORCH", raising=False)
    fast.usable.cache_clear()
    try:
        with pytest.warns(UserWarning, match="outside the releases the fast path is tested on"):
            assert not fast.usable()
        model = create_model("convnext_atto", num_classes=3)
        opt = fast.optimize(model, compile=False)
        assert not any(isinstance(m, fast.FastConvNeXt) for m in opt.modules())
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(opt(x), model.eval()(x))
    finally:
        fast.usable.cache_clear()

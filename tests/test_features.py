"""`predict --features OUT` on real images (the shared CIFAR-10 JPEGs): OUT.npy holds the pooled, normed features
(`forward_head(pre_logits=True)`) of each readable image in input order, OUT.csv its path and prediction; `--tta`
averages them over the mirror too; a path that cannot be written or a file already there is refused before any
work; `linear_probe` fits a logistic regression on them."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convnext.cli import main
from convnext.data.decode import find_images, load_image
from convnext.infer import linear_probe
from convnext.publish import pretrained_files, write_folder
from convnext.registry import create_model
from convnext.resolve import Preprocess, Resolved

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar"
CLASSES = ["airplane", "automobile", "frog", "ship"]
PRE = Preprocess(img_size=32, crop_pct=1.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} (the shared CIFAR-10 JPEGs) is not here")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cifar_images) -> tuple[torch.nn.Module, Path, Path]:
    """(a small 4-class model, its pretrained folder, a folder of 4 x 8 CIFAR-10 test images plus one bad file)."""
    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=len(CLASSES), depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).eval()
    write_folder(root / "model", *pretrained_files(Resolved(model, PRE, CLASSES, "made here", "convnext_atto")))
    images = cifar_images(root / "images", CLASSES, 8)
    (images / "ship" / "broken.jpg").write_bytes(b"not an image")
    return model, root / "model", images


def pooled(model: torch.nn.Module, files: list[Path], flip: bool = False) -> np.ndarray:
    x = torch.stack([PRE.transform()(load_image(f)) for f in files])
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        if flip:
            f = (f + model.forward_head(model.forward_features(x.flip(-1)), pre_logits=True)) / 2
    return f.numpy()


def test_features_are_the_pooled_normed_features_in_input_order(setup, tmp_path, capsys):
    model, model_dir, images = setup
    out = tmp_path / "emb"
    assert main(["predict", str(model_dir), str(images), "--device", "cpu", "--json", "--features", str(out)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    good = [r for r in rows if "topk" in r]
    assert len(rows) == 33 and len(good) == 32  # the broken file has no row in the features
    matrix = np.load(tmp_path / "emb.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (32, 64)
    files = [f for f in find_images([images]) if f.name != "broken.jpg"]
    np.testing.assert_allclose(matrix, pooled(model, files), rtol=1e-4, atol=1e-5)
    with open(tmp_path / "emb.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert [r["path"] for r in index] == [r["path"] for r in good] == [str(p) for p in files]
    assert [r["label"] for r in index] == [r["topk"][0]["label"] for r in good]
    assert [float(r["prob"]) for r in index] == pytest.approx([r["topk"][0]["prob"] for r in good], abs=1e-6)
    assert "features" not in rows[0]  # the printed lines stay small


def test_tta_features_are_the_mean_over_the_mirror(setup, tmp_path, capsys):
    model, model_dir, images = setup
    args = ["predict", str(model_dir), str(images / "frog"), "--device", "cpu", "--json", "--tta"]
    assert main(args + ["--features", str(tmp_path / "emb.npy")]) == 0  # OUT may carry the .npy suffix
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    files = find_images([images / "frog"])
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), pooled(model, files, flip=True), rtol=1e-4, atol=1e-5)
    x = torch.stack([PRE.transform()(load_image(f)) for f in files])
    with torch.no_grad():
        probs = ((model(x) + model(x.flip(-1))) / 2).softmax(1)
    assert [r["topk"][0]["prob"] for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)


def test_features_output_that_cannot_be_written_is_refused_before_any_work(setup, tmp_path, capsys):
    _, model_dir, images = setup
    base = ["predict", str(model_dir), str(images / "frog"), "--device", "cpu", "--features"]
    (tmp_path / "emb.csv").write_text("kept\n")
    assert main(base + [str(tmp_path / "emb")]) == 2
    err = capsys.readouterr()
    assert err.err.strip().splitlines() == [f"convnext predict: error: --features: {tmp_path / 'emb.csv'} exists; "
                                            "pass --force to overwrite it"]  # fmt: skip
    assert err.out == "" and not (tmp_path / "emb.npy").exists() and (tmp_path / "emb.csv").read_text() == "kept\n"
    (tmp_path / "afile").write_text("")
    for bad in (tmp_path / "afile" / "emb", tmp_path / "missing" / "emb"):
        assert main(base + [str(bad)]) == 2
        err = capsys.readouterr()
        assert "--features: cannot write" in err.err and "is not a folder" in err.err and err.out == ""
    assert main(base + [str(tmp_path / "emb"), "--force"]) == 0
    assert np.load(tmp_path / "emb.npy").shape == (8, 64) and (tmp_path / "emb.csv").read_text() != "kept\n"


def test_linear_probe_on_the_features(setup):
    pytest.importorskip("sklearn", reason="linear_probe uses scikit-learn (the test extra)")
    model, _, images = setup
    files = [f for f in find_images([images]) if f.name != "broken.jpg"]
    labels = [f.parent.name for f in files]
    feats = pooled(model, files)
    probe = linear_probe(feats, labels, test_fraction=0.25)
    assert (probe["n_train"], probe["n_test"]) == (24, 8)
    assert probe["train_accuracy"] > 0.9  # 24 points in 64 dimensions: separable
    assert 0 <= probe["test_accuracy"] <= 1
    assert set(probe["classifier"].predict(feats)) <= set(CLASSES)
    whole = linear_probe(feats, labels, test_fraction=0)
    assert whole["n_test"] == whole["n_train"] == 32 and whole["test_accuracy"] == whole["train_accuracy"]


def test_linear_probe_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        linear_probe(np.zeros((4, 2), np.float32), [0, 1, 0, 1])

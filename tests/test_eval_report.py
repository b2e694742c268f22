"""`convnext eval`'s report on real images (the shared CIFAR-10 JPEGs): every number of metrics.json equals
scikit-learn's on the same predictions, the PNGs are written, the most confused pairs name their own images, and
`--tta` scores the mean of the image's and its mirror's logits and shows the gain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnext.cli import main
from convnext.data import ImageFolder
from convnext.infer import run_eval
from convnext.publish import pretrained_files, write_folder
from convnext.registry import create_model
from convnext.resolve import Preprocess, Resolved

metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (the test extra) checks the numbers")

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog"]
PRE = Preprocess(img_size=32, crop_pct=1.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
pytestmark = pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} (the shared CIFAR-10 JPEGs) is not here")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_images) -> Path:
    return cifar_images(tmp_path_factory.mktemp("cifar"), CLASSES, 6)


@pytest.fixture(scope="module")
def model(folder) -> torch.nn.Module:
    """A small random 6-class ConvNeXt whose head is the class means of its pooled features on these images (a
    nearest-mean classifier): it predicts several classes, some right and some wrong."""
    torch.manual_seed(0)
    net = create_model("convnext_atto", num_classes=len(CLASSES), depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).eval()
    x, y = images(folder)
    with torch.no_grad():
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        means = torch.stack([pooled[y == k].mean(0) for k in range(len(CLASSES))])
        net.head.weight.copy_(means * 10)
        net.head.bias.copy_(-(means**2).sum(1) * 5)  # logits = -5 |f - mean|^2 + 5 |f|^2
    return net


def images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the folder as the model sees it (N, 3, 32, 32) and the targets, in ImageFolder's order."""
    ds = ImageFolder(folder, PRE.transform())
    return torch.stack([x for x, _ in ds]), torch.tensor(ds.targets)


def logits_of(model: torch.nn.Module, folder: Path, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K) in float64, targets); `flip`: the mean of the image's and its mirror's."""
    x, y = images(folder)
    with torch.no_grad():
        out = (model(x) + model(x.flip(-1))) / 2 if flip else model(x)
    return out.double().numpy(), y.numpy()


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_report_numbers_equal_scikit_learns(folder, model, tmp_path):
    got = run_eval(Resolved(model, PRE, list(CLASSES), "made here", "tiny"), folder, batch_size=7,
                   output_dir=tmp_path / "out")  # fmt: skip
    logits, y = logits_of(model, folder)
    pred = logits.argmax(1)
    probs = torch.from_numpy(logits).softmax(1).numpy()
    assert 1 < len(set(pred)) and 0 < (pred == y).mean() < 1  # a real test: several classes, right and wrong
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    labels = list(range(len(CLASSES)))
    p, r, f, s = metrics.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, c in enumerate(CLASSES):
        row = report["per_class"][c]
        assert row["precision"] == pytest.approx(p[i]) and row["recall"] == pytest.approx(r[i])
        assert row["f1"] == pytest.approx(f[i]) and row["support"] == s[i] == 6
    assert report["macro_f1"] == pytest.approx(metrics.f1_score(y, pred, average="macro", zero_division=0))
    assert report["weighted_f1"] == pytest.approx(metrics.f1_score(y, pred, average="weighted", zero_division=0))
    assert report["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(y, pred))
    assert report["top1"] == pytest.approx(100 * metrics.accuracy_score(y, pred))
    assert report["top5"] == pytest.approx(100 * metrics.top_k_accuracy_score(y, probs, k=5, labels=labels))
    assert report["confusion"] == metrics.confusion_matrix(y, pred, labels=labels).tolist()
    assert report["ece"] == pytest.approx(ece(probs.max(1), pred == y), abs=1e-6)
    assert sum(b["count"] for b in report["reliability"]) == len(y)
    for key in ("macro_f1", "balanced_accuracy", "ece"):  # the summary carries the headline numbers too
        assert got[key] == report[key]
    for key in ("confusion_png", "confusion_counts_png", "reliability_png", "confused_png"):
        assert Image.open(report[key]).format == "PNG", key


def test_most_confused_pairs_name_their_images(folder, model, tmp_path):
    run_eval(Resolved(model, PRE, list(CLASSES), "made here", "tiny"), folder, output_dir=tmp_path, pairs=3)
    report = json.loads((tmp_path / "metrics.json").read_text())
    logits, y = logits_of(model, folder)
    pred = logits.argmax(1)
    cm = np.array(report["confusion"])
    off = cm - np.diag(np.diag(cm))
    pairs = report["most_confused"]
    assert 1 <= len(pairs) <= 3
    assert [p["count"] for p in pairs] == sorted(off.ravel(), reverse=True)[: len(pairs)]
    files = sorted(str(f) for f in folder.rglob("*.jpg"))  # ImageFolder's order
    for pair in pairs:
        t, q = CLASSES.index(pair["true"]), CLASSES.index(pair["predicted"])
        assert off[t, q] == pair["count"] and 1 <= len(pair["examples"]) <= min(4, pair["count"])
        assert all(y[i] == t and pred[i] == q for i in pair["examples"])
        assert pair["files"] == [files[i] for i in pair["examples"]]
        assert all(Path(f).parent.name == pair["true"] for f in pair["files"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    write_folder(folder, *pretrained_files(Resolved(model, PRE, list(CLASSES), "made here", "convnext_atto")))
    return folder


def test_eval_cli_prints_the_headline_and_the_tta_gain(folder, model, model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["eval", str(model_dir), "--data", str(folder), "--device", "cpu", "--output-dir", str(out)]
    assert main(args + ["--tta"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert f"macro-F1 {report['macro_f1']:.4f}" in text and f"ECE {report['ece']:.4f}" in text
    assert f"balanced accuracy {report['balanced_accuracy']:.4f}" in text
    tta = report["tta"]
    assert f"TTA over 2 views: top-1 {report['top1']:.2f}% vs {tta['top1_without']:.2f}% without" in text
    flipped, y = logits_of(model, folder, flip=True)
    plain, _ = logits_of(model, folder)
    assert report["top1"] == pytest.approx(100 * (flipped.argmax(1) == y).mean())  # the mean of the two views
    assert tta["top1_without"] == pytest.approx(100 * (plain.argmax(1) == y).mean())
    assert tta["gain"] == pytest.approx(report["top1"] - tta["top1_without"]) and tta["views"] == 2
    assert report["preprocess"]["tta_flip"] is True


def test_tta_keeps_the_shifts_of_the_run_recipe(folder, model):
    """A run trained with data.tta_shift keeps its shifts under --tta: 6 views (3 positions x mirror)."""
    shifted = Preprocess(32, 1.0, PRE.mean, PRE.std, tta_shift=2)
    got = run_eval(Resolved(model, shifted, list(CLASSES), "made here", "tiny"), folder, tta=True)
    assert got["tta"]["views"] == 6 and got["preprocess"]["tta_shift"] == 2 and got["preprocess"]["tta_flip"]

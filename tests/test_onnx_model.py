"""An .onnx file as a model: `convnext export --format onnx` writes the preprocessing and names into the file,
`resolve` reads them back into an onnxruntime-backed module, and `predict` / `eval` on the file give the
checkpoint's top-1 on real images, and its int8 quantization mostly the float32 file's."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import onnx
import pytest
import torch

from convnext.cli import main
from convnext.data import load_image
from convnext.export import export_model
from convnext.onnx_model import REQUIRED, OnnxModel, read_metadata, write_metadata
from convnext.registry import create_model
from convnext.resolve import Preprocess, resolve

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar"
needs_cifar = pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} (the shared CIFAR-10 JPEGs) is not here")


def cifar_folder(dest: Path, split: str = "test", per_class: int = 3) -> Path:
    """The first `per_class` images of each class of the shared CIFAR-10 `split`, as dest/<class>/NNNN.jpg."""
    taken: dict[str, int] = {}
    with tarfile.open(CIFAR) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 4 and parts[-3] == split and taken.get(parts[-2], 0) < per_class:
                taken[parts[-2]] = taken.get(parts[-2], 0) + 1
                (dest / parts[-2]).mkdir(parents=True, exist_ok=True)
                (dest / parts[-2] / parts[-1]).write_bytes(tar.extractfile(m).read())
    return dest


def randomized(seed: int = 0) -> torch.nn.Module:
    """A small 10-class ConvNeXt with weights far from their init (so its logits are far apart), in eval mode."""
    torch.manual_seed(seed)
    model = create_model("convnext_atto", num_classes=10, **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.5))
    return model.eval()


def trained(images: Path, steps: int = 30) -> torch.nn.Module:
    """`randomized()` fitted briefly to the images of a class folder (a random ConvNeXt gives every real image the
    same class), in eval mode."""
    model, transform = randomized().train(), Preprocess(img_size=32).transform()
    paths = sorted(images.rglob("*.jpg"))
    classes = sorted({p.parent.name for p in paths})
    x = torch.stack([transform(load_image(p)) for p in paths])
    y = torch.tensor([classes.index(p.parent.name) for p in paths])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(a weight file, its .onnx written by `convnext export` at 32 px with dynamic batch and size)."""
    d = tmp_path_factory.mktemp("onnx")
    model = trained(cifar_folder(d / "train", "train", 5)) if CIFAR.is_file() else randomized()
    torch.save(model.state_dict(), d / "w.pth")
    args = ["export", str(d / "w.pth"), "--format", "onnx", "--output", str(d / "m.onnx"), "--img-size", "32"]
    assert main(args + ["--dynamic-batch", "--dynamic-size"]) == 0
    return d / "w.pth", d / "m.onnx"


def test_resolve_reads_the_preprocessing_and_names_back(exported, tmp_path):
    weights, path = exported
    got, want = resolve(path), resolve(weights, img_size=32)
    assert got.preprocess == want.preprocess == Preprocess(img_size=32)
    assert got.name == want.name and got.arch == want.arch and str(weights) in got.provenance
    assert isinstance(got.model, OnnxModel) and got.classes is None and got.label(3) == "3"
    meta = read_metadata(path)
    assert set(REQUIRED) <= set(meta) and meta["dynamic_size"] is True and meta["mean"] == list(want.preprocess.mean)
    # class names in the file are the labels, one per output (another count: unknown)
    named = tmp_path / "named.onnx"
    shutil.copy(path, named)
    write_metadata(named, {"classes": [f"c{i}" for i in range(10)], "interpolation": "bilinear"})
    r = resolve(named)
    assert r.label(3) == "c3" and r.preprocess.interpolation == "bilinear"
    write_metadata(named, {"classes": ["a", "b"]})
    assert resolve(named).classes is None


def test_the_onnx_model_computes_the_checkpoint_at_any_batch_and_size(exported):
    weights, path = exported
    onnx_model, eager = resolve(path).model, resolve(weights).model
    for shape in [(1, 3, 32, 32), (5, 3, 32, 32), (2, 3, 64, 96)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(onnx_model(x), eager(x), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="takes 32 px only"):  # a fixed-size file at another size
        fixed = path.parent / "fixed.onnx"
        export_model(
            eager, "onnx", fixed, img_size=32, batch_size=2, metadata=read_metadata(path) | {"dynamic_size": False}
        )
        resolve(fixed, img_size=64)
    x = torch.randn(5, 3, 32, 32)  # a file traced at batch 2 runs batch 5 in chunks
    with torch.inference_mode():
        torch.testing.assert_close(resolve(fixed).model(x), eager(x), atol=1e-4, rtol=0)


def test_it_is_inference_only(exported):
    model = resolve(exported[1]).model
    assert not model.training and list(model.parameters()) == []
    with pytest.raises(RuntimeError, match="cannot be trained"):
        model.train()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="no gradients"):
        model(x).sum().backward()
    with pytest.raises(ValueError, match="fixed model"):
        resolve(exported[1], num_classes=3)


def test_a_file_without_our_metadata_is_refused_in_one_line(exported, tmp_path, capsys):
    bare = onnx.load(str(exported[1]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match=r"no convnext metadata \(model, classes, img_size, crop_pct, mean, std"):
        resolve(tmp_path / "bare.onnx")
    assert main(["predict", str(tmp_path / "bare.onnx"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bare.onnx: no convnext metadata" in err
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve(tmp_path / "missing.onnx")


@needs_cifar
def test_predict_and_eval_on_the_onnx_equal_the_checkpoint_on_real_images(exported, tmp_path, capsys):
    weights, path = exported
    images = cifar_folder(tmp_path / "cifar")

    def run(*args: str) -> list[dict]:
        assert main([*args, "--json"]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    onnx_rows, torch_rows = run("predict", str(path), str(images)), run("predict", str(weights), "--img-size", "32",
                                                                         str(images))  # fmt: skip
    assert len(onnx_rows) == 30 and [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    assert [r["topk"][0]["label"] for r in onnx_rows] == [r["topk"][0]["label"] for r in torch_rows]
    assert len({r["topk"][0]["label"] for r in onnx_rows}) > 1  # not one class for everything
    (got,), (want,) = run("eval", str(path), "--data", str(images)), run("eval", str(weights), "--img-size", "32",
                                                                          "--data", str(images))  # fmt: skip
    assert got["n"] == want["n"] == 30 and got["top1"] == want["top1"]
    assert got["per_class_accuracy"] == want["per_class_accuracy"]


@needs_cifar
def test_int8_agrees_with_float32_on_most_real_images(exported, tmp_path, capsys):
    weights, path = exported
    calib, test = cifar_folder(tmp_path / "calib", "train", 8), cifar_folder(tmp_path / "test", "test", 10)
    args = ["export", str(weights), "--format", "onnx", "--img-size", "32", "--dynamic-batch", "--int8"]
    assert main(args + ["--calib", str(calib), "--calib-images", "64", "--output", str(tmp_path / "q.onnx")]) == 0
    capsys.readouterr()
    fp32, int8 = resolve(path), resolve(tmp_path / "q.onnx")
    assert int8.preprocess == fp32.preprocess and "64 calibration images from" in int8.model.metadata["quantization"]
    transform = fp32.preprocess.transform()
    x = torch.stack([transform(load_image(p)) for p in sorted(test.rglob("*.jpg"))])
    with torch.inference_mode():
        a, b = fp32.model(x).argmax(1), int8.model(x).argmax(1)
    assert len(x) == 100 and len(set(a.tolist())) > 2
    assert (a == b).float().mean() >= 0.9

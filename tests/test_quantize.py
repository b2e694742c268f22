"""int8 ONNX: calibration images from a run's own data or a folder, the quantized file keeps the export's metadata,
and bad requests stop in one line writing nothing (int8 against float32 on real images: test_onnx_model.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

from convnext.cli import main
from convnext.export import deploy_metadata
from convnext.onnx_model import read_metadata
from convnext.quantize import QUANTIZED_OPS, calibration_images, export_int8
from convnext.resolve import Preprocess, resolve

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real tiny classification run: one epoch on the embedded digits."""
    from convnext.train import fit, get_preset

    cfg = get_preset("demo")
    out = tmp_path_factory.mktemp("run") / "run"
    model = dataclasses.replace(cfg.model, kwargs=dict(SMALL))
    cfg = dataclasses.replace(cfg, epochs=1, batch_size=256, output=str(out), fast=False, threads=1, device="cpu",
                              model=model)  # fmt: skip
    fit(cfg)
    return out


def test_calibration_images_come_from_the_runs_training_data_or_a_folder(run, tmp_path):
    loaded = resolve(run)
    x = calibration_images(loaded.preprocess, 20, run=loaded.run)
    size = loaded.preprocess.img_size
    assert x.shape == (20, 3, size, size) and x.std() > 0.1
    assert not torch.equal(x[0], x[-1])  # spread over the data, not one image repeated
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (40, 30), (50 * i, 20, 200 - 30 * i)).save(folder / "a" / f"{i}.png")
    y = calibration_images(Preprocess(img_size=16), 3, calib=folder)
    assert y.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="--int8 needs calibration images"):
        calibration_images(Preprocess(), 8)
    with pytest.raises(FileNotFoundError, match="--calib"):
        calibration_images(Preprocess(), 8, calib=tmp_path / "nope")


def test_int8_export_of_a_run_keeps_its_metadata(run, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["export", str(run), "--format", "onnx", "--int8", "--calib-images", "32", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8 vs float32 on its 32 calibration images" in printed
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "LayerNormalization"} <= ops
    meta, fp32 = read_metadata(out), resolve(run)
    assert "run's training images" in meta["quantization"] and "32 calibration images" in meta["quantization"]
    got = resolve(out)
    assert got.preprocess == fp32.preprocess and got.classes == fp32.classes and got.name == fp32.name
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]


def test_int8_leaves_the_stem_and_the_classifier_float32(run, tmp_path):
    """Every convolution and matrix product reads int8 weights (a DequantizeLinear) except the stem's (fed the image)
    and the classifier (giving the logits): int8 there cost most of the drop on a fine-tuned run."""
    loaded = resolve(run)
    images = calibration_images(loaded.preprocess, 16, run=loaded.run)
    report = export_int8(loaded.model, tmp_path / "q.onnx", images, deploy_metadata(loaded))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    weighted = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
    float32 = [n for n in weighted if made_by.get(n.input[1]) != "DequantizeLinear"]
    assert [n.name for n in float32] == report.float32_nodes and len(float32) == 2 and len(weighted) > 10
    stem, head = float32
    assert stem.op_type == "Conv" and stem.input[0] == graph.input[0].name  # the image itself, not an int8 copy
    assert head.output[0] == graph.output[0].name and made_by[head.input[0]] != "DequantizeLinear"
    assert report.agreement >= 0.9


def test_bad_requests_stop_in_one_line_and_write_nothing(run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    base = ["export", "convnext_atto", "--output", str(out)]
    cases = [
        (["--format", "onnx", "--int8"], "--int8 needs calibration images"),
        (["--format", "torchscript", "--int8", "--calib", str(tmp_path)], "--int8 needs --format onnx"),
        (["--format", "onnx", "--int8", "--dtype", "fp16", "--calib", str(tmp_path)], "--dtype fp32"),
        (["--format", "torchscript", "--dynamic-size"], "--dynamic-size needs --format onnx"),
        (["--format", "onnx", "--calib", str(tmp_path)], "go with --int8"),
        (["--format", "onnx", "--int8", "--calib", str(tmp_path / "nope")], "--calib"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (flags, err)
    (tmp_path / "x.onnx").write_bytes(b"")
    assert main(["export", str(tmp_path / "x.onnx"), "--format", "onnx", "--output", str(out)]) == 2
    assert "ONNX file already" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "x.onnx")]) == 2
    assert "bench times PyTorch models" in capsys.readouterr().err
    assert not out.exists()

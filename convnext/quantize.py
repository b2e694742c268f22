"""int8 ONNX: onnxruntime's post-training static quantization of a checked float32 export.

The float32 file is exported and checked against eager PyTorch first (`export_model`); onnxruntime's
`quantize_static` then stores int8 weights (per output channel) and int8 activations (one scale per tensor, the
MinMax range seen on calibration images) around every convolution and matrix product of the blocks and the
downsampling layers, as QuantizeLinear / DequantizeLinear pairs (QDQ, the format onnxruntime's CPU kernels fuse).
The stem's convolution (fed the image) and the classifier (giving the logits) stay float32 (`float32_ends`): they
hold about 1% of the multiply-adds or less, and on a fine-tuned CamVid run int8 there cost 0.86 of a 1.0 point top-1
drop (docs/export.md, int8). LayerNorm, GELU, GRN, layer scale and the residual sums stay float32.
Calibration images are the run's own training images or a folder, preprocessed as the model evaluates them. The
file keeps the export's metadata, so `resolve` and `predict` run it as any .onnx.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnext.data import build_dataset, load_image
from convnext.data.decode import find_images
from convnext.data.transforms import first_resize_side
from convnext.export import ExportReport, export_model, quiet_loggers
from convnext.extras import require
from convnext.onnx_model import OnnxModel, write_metadata
from convnext.resolve import Preprocess

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # the ops with weights: where int8 saves time and memory
CALIB_BATCH = 16  # calibration batch for a file with a dynamic batch


def calibration_images(
    preprocess: Preprocess, count: int, calib: str | Path | None = None, run: dict[str, Any] | None = None
) -> torch.Tensor:
    """`count` images (N, C, S, S) spread evenly over the folder `calib` (its image files, subfolders included) or,
    without it, over the training split of the data of `run` (a run's config.json), preprocessed as `preprocess`
    evaluates. Raises a one-line ValueError when there is neither, FileNotFoundError for a folder with no images."""
    transform = preprocess.transform()
    if calib is not None:
        if not Path(calib).is_dir():
            raise FileNotFoundError(f"--calib {calib}: not a folder of images")
        paths = find_images(calib)
        picked = [paths[i] for i in _spread(len(paths), count)]
        return torch.stack([transform(load_image(p, first_resize_side(transform))) for p in picked])
    data = (run or {}).get("data") or {}
    if not data.get("name"):
        raise ValueError("--int8 needs calibration images: give --calib DIR (a folder of images) or export a "
                         "training run, whose own training images are used")  # fmt: skip
    ds, _ = build_dataset(str(data["name"]), "train", transform, data_dir=data.get("data_dir"),
                          val_split=float(data.get("val_split", 0.1)), download=False)  # fmt: skip
    return torch.stack([ds[i][0] for i in _spread(len(ds), count)])


def float32_ends(path: str | Path) -> list[str]:
    """The names of the weighted nodes of the ONNX file at `path` that stay float32: those fed the graph's input
    (the stem's convolution) and those giving its output (the classifier)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    ends = [n for n in graph.node if inputs & set(n.input) or outputs & set(n.output)]
    return [n.name for n in ends if n.op_type in QUANTIZED_OPS]


def _spread(n: int, count: int) -> list[int]:
    """Up to `count` indices spread evenly over range(n): every class of a sorted folder is represented."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, count))}) if n else []


class CalibrationReader:
    """onnxruntime's CalibrationDataReader: the calibration images in batches of `batch` (the file's input batch)."""

    def __init__(self, name: str, images: np.ndarray, batch: int):
        self.batches = iter([{name: images[i : i + batch]} for i in range(0, len(images) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@dataclass
class Int8Report:
    path: str
    calibration_images: int
    agreement: float  # share of the calibration images whose int8 top-1 is the float32 file's
    max_diff: float  # max |int8 logits - float32 logits| on them
    float32_nodes: list[str]  # the weighted nodes left float32 (`float32_ends`: stem and classifier)
    fp32: ExportReport  # the float32 export's parity check against eager PyTorch

    def as_dict(self) -> dict:
        return asdict(self)


def export_int8(
    model: nn.Module,
    output: str | Path,
    images: torch.Tensor,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    source: str = "",
    **export_kwargs: Any,
) -> Int8Report:
    """Export `model` to ONNX (checked as `export_model` checks it; `export_kwargs` are its options) and write
    its int8 quantization to `output`, calibrated on `images` (N, C, S, S) preprocessed as the model evaluates.
    `source` says where the images came from, in the file's metadata. Nothing is written unless all of it works."""
    require("onnx", "onnxscript", "onnxruntime", what="int8 ONNX export")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    output = Path(output)
    dynamic = export_kwargs.get("dynamic_batch", False)
    batch = min(CALIB_BATCH, len(images)) if dynamic else export_kwargs.get("batch_size", 1)
    if len(images) < max(batch, 1):
        raise ValueError(f"--int8: {len(images)} calibration images, fewer than the file's batch of {batch}")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    if output.is_dir():
        raise IsADirectoryError(f"{output} is a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=output.parent))
    try:
        (tmp / "fp32").mkdir()
        fp32_path, int8_path = tmp / "fp32" / output.name, tmp / output.name
        fp32 = export_model(model, "onnx", fp32_path, img_size=images.shape[-1], metadata=metadata, **export_kwargs)
        ref = OnnxModel(fp32_path)
        x = images.float().numpy()
        keep = float32_ends(fp32_path)
        with quiet_loggers(
            "", level=logging.ERROR
        ):  # its advice, on the root logger, to run its pre-processing (which gains nothing here)
            quantize_static(
                fp32_path,
                int8_path,
                CalibrationReader(ref.input_name, x, batch),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep,
            )
        n = len(x) - len(x) % batch
        method = "onnxruntime QDQ, per-channel weights, stem and classifier float32"
        info = f"int8 static ({method}), {n} calibration images{source}"
        write_metadata(int8_path, (metadata or {}) | {"quantization": info})
        int8 = OnnxModel(int8_path)
        got, want = int8.run(x), ref.run(x)
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        fp32 = replace(fp32, path=str(output))  # the float32 file it was made from is not kept
        report = Int8Report(str(output), n, agreement, float(np.abs(got - want).max()), keep, fp32)
        for f in tmp.iterdir():
            if f.is_file():
                os.replace(f, output.parent / f.name)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

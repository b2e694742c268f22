"""Export a model to ONNX, TorchScript or a torch.export ExportedProgram (.pt2), and prove the file matches eager.

The written file is loaded back (ONNX through onnxruntime) and run on the same random input as the eager model;
the largest difference is reported and the export fails if it is over tolerance. Exports take and return float32
tensors whatever `dtype` is; inside an fp16/bf16 export every normalisation (LayerNorm, GRN) runs in float32, so
the sum of squares cannot overflow (ConvNeXt-V2 issue #66). An ONNX file also carries the model's name, class
names and eval preprocessing in its metadata (`deploy_metadata`), which `resolve("model.onnx")` reads back.

ONNX files are opset 20 by default: GELU is one `Gelu` op, which onnxruntime runs as one kernel (with the bias
add before it, BiasGelu, where the batch or size is dynamic; at fixed shapes it folds that add into a Gemm instead).
Up to opset 19 the exporter writes GELU as x * (0.5 * (1 + erf(x / sqrt 2))), an order onnxruntime's GELU fusion
does not match, so five elementwise ops on each block's widest tensor remain (issue 41).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnext.extras import require
from convnext.model import GRN
from convnext.resolve import Resolved

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "exported-program")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Allowed max |export - eager| relative to max(1, max |eager|): the eager reference runs in the same dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
_KEEP_FP32 = (nn.LayerNorm, GRN, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class ParityError(RuntimeError):
    """The exported file's outputs differ from eager PyTorch by more than the tolerance."""


class Float32(nn.Module):
    """Runs the wrapped module in float32 and hands back the input's dtype (for norms inside fp16/bf16 graphs)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


class CastIO(nn.Module):
    """float32 input -> `dtype` model -> float32 output, so users feed the same tensors to every export."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def prepare(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """An eval-mode copy of `model` ready to export in `dtype` (fp32 | fp16 | bf16); norms stay float32."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dtype == "fp32":
        return model.float()
    model = model.to(DTYPES[dtype])
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _KEEP_FP32):
                setattr(parent, name, Float32(child))
    return CastIO(model, DTYPES[dtype]).eval()


def deploy_metadata(loaded: Resolved, dynamic_size: bool = False) -> dict[str, Any]:
    """What an .onnx file carries so that it runs without this package's checkpoint (`convnext.onnx_model`): the
    model's name and provenance, its class names and its eval preprocessing."""
    return {"model": loaded.name, "arch": loaded.arch, "provenance": loaded.provenance, "classes": loaded.classes,
            **asdict(loaded.preprocess), "dynamic_size": dynamic_size}  # fmt: skip


@dataclass
class ExportReport:
    path: str
    format: str
    dtype: str
    img_size: int  # the input side the file was checked at first (NCHW input (B, in_chans, S, S))
    batch_sizes: list[int]  # the batch sizes the file was checked at
    sizes: list[int]  # the input sides it was checked at (two with dynamic_size)
    max_diff: float  # max |export - eager in the same dtype|
    max_diff_vs_fp32: float  # max |export - eager float32 model|: the precision cost of dtype
    tolerance: float  # the allowed max_diff (already scaled by the output's magnitude)
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def export_model(
    model: nn.Module,
    fmt: str,
    output: str | Path,
    img_size: int = 224,
    in_chans: int = 3,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dtype: str = "fp32",
    force: bool = False,
    atol: float | None = None,
    opset: int = 20,
    dynamic_size: bool = False,
    metadata: dict[str, Any] | None = None,
) -> ExportReport:
    """Export `model` and check the written file against eager PyTorch; raises ParityError if it does not match.

    img_size: the input side the graph is traced and checked at; `convnext export` gives the size the model is
        evaluated at (`Preprocess.img_size`: published weights' test size where their spec has one, or --img-size).
    batch_size: the input batch the graph is traced with (fixed in the file unless `dynamic_batch`).
    dynamic_batch: any batch size works; checked at a second batch size.
    dynamic_size: (ONNX) any height and width >= the network's total stride works; checked at a second size.
    metadata: (ONNX) stored in the file's metadata_props (`deploy_metadata`: what `resolve` reads back).
    opset: (ONNX) 17 or newer; 20 (the default) writes GELU as one op that onnxruntime fuses (module docstring).
    force: overwrite an existing `output` (otherwise FileExistsError). A file that fails the check is not kept.
    atol: tolerance relative to max(1, max |output|); defaults per dtype (TOLERANCE).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if fmt == "onnx" and dtype == "bf16":
        raise ValueError("bf16 ONNX cannot be checked: onnxruntime has no bfloat16 Conv kernel; use --dtype fp16")
    if dynamic_size and fmt != "onnx":
        raise ValueError(f"--dynamic-size needs --format onnx: a {fmt} file is checked at one input size only")
    if metadata and fmt != "onnx":
        raise ValueError(f"metadata is stored in ONNX files only, not {fmt}")
    if opset < 17:
        raise ValueError(f"opset must be 17 or newer (LayerNormalization), got {opset}")
    if fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime", what="ONNX export")
    output = Path(output)
    if fmt == "exported-program" and output.suffix != ".pt2":
        raise ValueError(f"{output}: an ExportedProgram file must end in .pt2 (torch.export.load requires it)")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    if output.is_dir():
        raise IsADirectoryError(f"{output} is a directory")
    output.parent.mkdir(parents=True, exist_ok=True)

    fp32_model = copy.deepcopy(model).eval().float()
    export = prepare(model, dtype)
    trace_batch = max(batch_size, 2) if dynamic_batch else batch_size  # torch.export specialises batch 1
    # torch.export also specialises a side whose last feature map is 1 x 1 (32 px for ConvNeXt): trace at 64 or more
    trace_size = max(img_size, 64) if dynamic_size else img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(trace_batch, in_chans, trace_size, trace_size, generator=gen)

    # Write into a private folder beside the target (so external ONNX data lands beside it too), then move.
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=output.parent))
    try:
        written = tmp / output.name
        _write(export, fmt, written, x, dynamic_batch, dynamic_size, opset)
        if metadata:
            from convnext.onnx_model import write_metadata

            write_metadata(written, metadata)
        run = _load(fmt, written)
        batches = [trace_batch] + ([trace_batch + 3] if dynamic_batch else [])
        sizes = [img_size] + ([trace_size if trace_size != img_size else img_size + 32] if dynamic_size else [])
        max_diff = max_fp32 = scale = 0.0
        with torch.inference_mode():
            for b, side in [(b, sizes[0]) for b in batches] + [(batches[0], side) for side in sizes[1:]]:
                xb = torch.randn(b, in_chans, side, side, generator=gen)
                got, ref, ref32 = run(xb), export(xb).float().numpy(), fp32_model(xb).float().numpy()
                if got.shape != ref.shape:
                    raise ParityError(f"{fmt} export gave shape {got.shape} for {xb.shape}, eager {ref.shape}")
                max_diff = max(max_diff, float(np.abs(got - ref).max()))
                max_fp32 = max(max_fp32, float(np.abs(got - ref32).max()))
                scale = max(scale, float(np.abs(ref).max()))
        tol = (TOLERANCE[dtype] if atol is None else atol) * max(1.0, scale)
        report = ExportReport(
            str(output), fmt, dtype, img_size, batches, sizes, max_diff, max_fp32, tol, max_diff <= tol
        )
        if not report.ok:
            raise ParityError(
                f"{fmt} {dtype} export differs from eager by {max_diff:.3g} > tolerance {tol:.3g}; file not written"
            )
        for f in tmp.iterdir():
            os.replace(f, output.parent / f.name)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(
    model: nn.Module, fmt: str, path: Path, x: torch.Tensor, dynamic_batch: bool, dynamic_size: bool, opset: int
) -> None:
    batch = torch.export.Dim("batch") if dynamic_batch else None
    if fmt == "onnx":
        dims = {0: batch} if dynamic_batch else {}
        if dynamic_size:  # traced at x's size: torch.export's guards (not in the ONNX graph) start there
            dims |= {2: torch.export.Dim("height", min=x.shape[2]), 3: torch.export.Dim("width", min=x.shape[3])}
        with quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):  # its optimiser logs every rewrite at INFO
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"x": dims} if dims else None,
                verbose=False,
                external_data=_param_bytes(model) > 1.5 * 2**30,  # the protobuf limit is 2 GiB
            )
    elif fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", ".*is deprecated.*", FutureWarning)  # the user asked for TorchScript
            torch.jit.trace(model, (x,), check_trace=False).save(str(path))
    else:
        ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}} if dynamic_batch else None)
        torch.export.save(ep, str(path))


def _load(fmt: str, path: Path):
    """A function numpy-returning function that runs the file at `path` on a float32 NCHW tensor."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})[0].astype(np.float32)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is deprecated.*", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = torch.export.load(str(path)).module()
    return lambda x: module(x).float().numpy()


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING):
    """Only messages of `level` and above from the loggers `names` ("": the root logger) while inside."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

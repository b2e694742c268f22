"""An exported .onnx file as a torch module: onnxruntime runs the graph, the file's metadata says how to feed it.

`convnext export --format onnx` writes, beside the graph, what a deployment needs to preprocess an image and name
its prediction (`metadata_props`, each value JSON): the model's name and provenance, its class names, and the eval
preprocessing (img_size, crop_pct, mean, std, interpolation, crop_mode, tta_flip, tta_shift). `convnext.resolve`
reads a file back into a model with that preprocessing, so `predict` and `eval` run an .onnx as any checkpoint.
Inference only: `OnnxModel` has no parameters, cannot train and has no gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Every key a file must carry for `read_metadata` to accept it (a value may be null: classes unknown).
REQUIRED = ("model", "classes", "img_size", "crop_pct", "mean", "std", "interpolation")
OPTIONAL = ("provenance", "arch", "crop_mode", "tta_flip", "tta_shift", "dynamic_size", "quantization")


def write_metadata(path: str | Path, meta: dict[str, Any]) -> None:
    """Set `meta` (values JSON-encoded) in the metadata_props of the .onnx file at `path`, in place; its external
    data files, if any, are left as they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props} | {k: json.dumps(v) for k, v in meta.items()}
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_metadata(session_or_path: Any, name: str | Path | None = None) -> dict[str, Any]:
    """The metadata `write_metadata` set (JSON values decoded) of an .onnx file or its onnxruntime session; a file
    without every REQUIRED key raises a one-line ValueError naming the missing ones (and the file: `name`)."""
    session = session_or_path if hasattr(session_or_path, "get_modelmeta") else _session(session_or_path)
    where = name or session_or_path
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in REQUIRED if k not in props]
    if missing:
        raise ValueError(f"{where}: no convnext metadata ({', '.join(missing)} missing): export it with "
                         "`convnext export --format onnx` to run it here")  # fmt: skip
    try:
        return {k: json.loads(v) for k, v in props.items() if k in REQUIRED + OPTIONAL}
    except ValueError as e:
        raise ValueError(f"{where}: metadata that is not JSON ({e})") from None


class OnnxModel(nn.Module):
    """Runs an .onnx file with onnxruntime's CPU provider: float32 (B, C, H, W) in, float32 logits out, on the
    input's device. A file traced at a fixed batch runs any batch, in chunks of that batch (the last one padded)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.metadata = read_metadata(self.session, self.path)
        spec = self.session.get_inputs()[0]
        self.input_name, self.input_shape = spec.name, list(spec.shape)  # dims are ints or names (dynamic)
        self.num_classes = self.session.get_outputs()[0].shape[-1]
        super().train(False)

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise RuntimeError(f"{self.path.name} runs in onnxruntime: an ONNX model cannot be trained")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Run.apply(x, self)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The logits of a float32 NCHW array."""
        batch = self.input_shape[0]
        if not isinstance(batch, int) or batch == len(x):
            return self.session.run(None, {self.input_name: x})[0]
        out = []
        for i in range(0, len(x), batch):
            part = x[i : i + batch]
            pad = np.zeros((batch - len(part), *x.shape[1:]), np.float32)
            out.append(self.session.run(None, {self.input_name: np.concatenate([part, pad])})[0][: len(part)])
        return np.concatenate(out)

    def extra_repr(self) -> str:
        return f"{self.path}, input {self.input_shape}"


class _Run(torch.autograd.Function):
    """The session as an autograd node whose backward says why there is none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, model: OnnxModel) -> torch.Tensor:
        logits = model.run(x.detach().float().contiguous().cpu().numpy())
        return torch.from_numpy(np.ascontiguousarray(logits, np.float32)).to(x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("an ONNX model runs in onnxruntime: it has no gradients (resolve the checkpoint instead)")


def _session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session using torch's thread count, its threads parked between calls: on few cores ORT's
    spinning threads otherwise slow the torch code that runs beside it (issue 41)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # warnings about unused initialisers and the like are not the user's business
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None

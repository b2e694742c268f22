"""`optimize()`: the fastest path this machine offers for a ConvNeXt, called like the original model.

Inference: a copy of the model in eval mode with layer scale folded into the last linear of each block, weights
and activations channels-last end to end (then LayerNorm over channels is a free view, no permute copies), optional
bf16 weights, and `torch.compile` with frozen, pre-packed weights (inductor `freezing`) and static shapes.
Training: the model itself (so the optimizer keeps its parameters), channels-last, bf16 autocast, and
`torch.compile(dynamic=False)`. Every path is checked against the plain model in the tests.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from convnext.model import Block


def fold_layer_scale(model: nn.Module) -> nn.Module:
    """gamma * (W x + b) == (gamma W) x + gamma b: fold each block's layer scale into pwconv2 (inference only)."""
    for block in model.modules():
        if isinstance(block, Block) and block.gamma is not None:
            with torch.no_grad():
                block.pwconv2.weight.mul_(block.gamma[:, None])
                block.pwconv2.bias.mul_(block.gamma)
            block.gamma = None
    return model


class Optimized(nn.Module):
    """Takes plain NCHW float input, converts it to what the inner module wants, returns float32 output."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, autocast: bool, device_type: str):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.autocast = autocast
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(memory_format=torch.channels_last)
        if self.autocast:
            with torch.autocast(self.device_type, dtype=self.dtype):
                out = self.inner(x)
        else:
            out = self.inner(x.to(self.dtype))
        return out.float()


def optimize(
    model: nn.Module,
    mode: str = "inference",
    dtype: torch.dtype = torch.float32,
    example_input: torch.Tensor | None = None,
    compile: bool = True,
) -> nn.Module:
    """Return a module called like `model` on NCHW float input, holding the fastest path found.

    mode: "inference" works on a frozen copy (the original is untouched); "train" wraps the model itself, so an
        optimizer built on `model.parameters()` still trains it.
    dtype: torch.float32 or torch.bfloat16 (bf16 weights for inference, bf16 autocast for training; on CUDA,
        float16 autocast too).
    example_input: if given, the compiled path is run once on it (compilation happens here, not on first call).
    compile: torch.compile the result (static shapes); off gives the eager channels-last path.
    """
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    device_type = next(model.parameters()).device.type
    if mode == "inference":
        inner = fold_layer_scale(copy.deepcopy(model).eval())
        for p in inner.parameters():
            p.requires_grad_(False)
        inner = inner.to(memory_format=torch.channels_last)
        use_autocast = dtype != torch.float32 and device_type == "cuda"
        if dtype != torch.float32 and not use_autocast:
            inner = inner.to(dtype)  # CPU LayerNorm accumulates in fp32 for bf16 input; GRN upcasts itself
        if compile:
            inner = torch.compile(inner, dynamic=False, options={"freezing": True})
        wrapped = Optimized(inner, dtype, use_autocast, device_type).eval()
        if example_input is not None:
            with torch.inference_mode():
                wrapped(example_input)
        return wrapped

    inner = model.to(memory_format=torch.channels_last).train()
    if compile:
        inner = torch.compile(inner, dynamic=False)
    wrapped = Optimized(inner, dtype, dtype != torch.float32, device_type).train()
    if example_input is not None:
        wrapped(example_input).float().sum().backward()
        model.zero_grad(set_to_none=True)
    return wrapped

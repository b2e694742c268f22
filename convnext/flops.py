"""What a model costs: parameters, multiply-accumulates (as the paper counts "FLOPs") and activation memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Cost:
    params: int
    gmacs: float  # per image, forward, convolutions and matmuls (the papers' "FLOPs")
    activation_mb: float  # per image: tensors autograd keeps for backward (the training activation memory)
    forward_mb: float  # per image: sum of every leaf module's output in one forward pass
    img_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, img_size: int = 224, in_chans: int | None = None) -> float:
    """Forward GMACs of one image, counted the way the papers' tables were (fvcore).

    Convolutions, linears and matmuls come from torch's FlopCounterMode (1 MAC = 2 FLOPs); normalisation
    layers add fvcore's per-element cost (LayerNorm 5 with affine, eval BatchNorm 2), which is what
    takes ConvNeXt-T from 4.456 to the paper's 4.47.
    """
    x = torch.zeros(1, in_chans or in_chans_of(model), img_size, img_size)
    norm_macs = [0]

    def norm_hook(m: nn.Module, inputs: tuple, _out: object) -> None:
        affine = getattr(m, "weight", None) is not None
        per_element = 2 if isinstance(m, nn.modules.batchnorm._BatchNorm) else 5
        norm_macs[0] += inputs[0].numel() * (per_element if affine else per_element - 1)

    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    handles = [m.register_forward_hook(norm_hook) for m in model.modules() if isinstance(m, norms)]
    was_training = model.training
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return (counter.get_total_flops() / 2 + norm_macs[0]) / 1e9


def activation_memory(model: nn.Module, img_size: int = 224, in_chans: int | None = None) -> tuple[float, float]:
    """(MB saved for backward, MB of leaf-module outputs) for one fp32 image in training mode."""
    x = torch.zeros(1, in_chans or in_chans_of(model), img_size, img_size)
    saved: dict[int, int] = {}  # storage id -> bytes, so views of one tensor count once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and not isinstance(t, nn.Parameter):
            saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    outputs = [0]

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs[0] += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    params = {id(p.untyped_storage()) for p in model.parameters()}
    was_training = model.training
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x.requires_grad_(False))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    saved_bytes = sum(b for k, b in saved.items() if k not in params)
    return saved_bytes / 2**20, outputs[0] / 2**20


def measure(model: nn.Module, img_size: int = 224) -> Cost:
    act, fwd = activation_memory(model, img_size)
    return Cost(count_params(model), count_gmacs(model, img_size), act, fwd, img_size)


def in_chans_of(model: nn.Module) -> int:
    """The input channels of a model: those of its first convolution."""
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return first_conv.in_channels

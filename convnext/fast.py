"""`optimize()`: the fastest path this machine offers for a ConvNeXt, called like the original model.

What makes it fast (measured in `benchmarks/NOTES.md`):
- The MLP's two "1x1 convolutions" run as real 1x1 convolutions on channels-last NCHW, using the Linear layers'
  own weights as views. PyTorch sends fp32 `nn.Linear` to MKL's sgemm, which on AMD CPUs takes a slower code path;
  oneDNN's convolution uses the full AVX-512 width, and under `torch.compile` it fuses GELU and the residual add
  into the convolution and prepacks the weights.
- Channels-last end to end: LayerNorm over channels is then a free view (no permute copies).
- Inference: layer scale folded into the last 1x1 conv, weights frozen and prepacked by inductor's `freezing`,
  static shapes, bf16 weights when asked for (LayerNorm accumulates in fp32; GRN computes its norm in fp32).
- Training: the same forward on the model's own parameters, bf16 autocast, `torch.compile(dynamic=False)` or eager
  (whichever times faster on the example input), with custom backwards: each 1x1 product on oneDNN or as a matmul,
  as measured per shape (`plan_pointwise`); in float32 the block's MLP as one op (`InvertedMlp`) that saves GELU's
  derivative instead of its input and applies it as a oneDNN post-op (or, where the plan measures it faster, runs
  the whole MLP over tiles of rows in cache in a C kernel), and LayerNorm at small C in a C kernel
  (`ChannelsLayerNorm`); depthwise grad-input as a flipped forward convolution and depthwise grad-weight in a C
  kernel (`convnext.kernels`).
- The process's allocator keeps freed activation buffers (`keep_freed_memory`): no page faults per step.
Models other than `ConvNeXt` (the roadmap's ResNet steps, say) get the generic part: channels-last, dtype, compile.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch._dynamo.config
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from convnext import kernels
from convnext.model import Block, ConvNeXt, LayerNorm2d

TESTED_TORCH = ((2, 14), (2, 14))  # the torch releases whose private ops (oneDNN pointwise conv, aten backward
# entry points) the fast path is tested on; on others it turns itself off unless CONVNEXT_FAST_ANY_TORCH=1


@functools.cache
def usable() -> bool:
    """Whether the fast path may run on this torch; where it may not, says once why and what runs instead."""
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    (lo, hi), reason = TESTED_TORCH, None
    if not lo <= (major, minor) <= hi and os.environ.get("CONVNEXT_FAST_ANY_TORCH") != "1":
        reason = (f"torch {torch.__version__} is outside the releases the fast path is tested on "
                  f"({lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}; CONVNEXT_FAST_ANY_TORCH=1 tries it anyway)")  # fmt: skip
    elif not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        reason = f"torch {torch.__version__} has no mkldnn._convolution_pointwise op"
    if reason:
        warnings.warn(f"{reason}: the plain PyTorch model runs instead of the fast path", stacklevel=2)
    return reason is None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed activation buffers instead of returning them to the OS after every step.

    By default glibc serves every block over 128 KiB-32 MiB with its own mmap and unmaps it when freed, so each
    step page-faults its activations in again: a 38 MB 1x1-conv output took 12.5 ms instead of 4.1 ms, and atto
    128 batch 64 trains 1.2x faster without it (benchmarks/NOTES.md). Here big blocks come from the heap
    (M_MMAP_MAX = 0) and the heap is trimmed only past 1 GiB free at its top: the process keeps its peak memory.
    It is process-wide: `optimize` calls it for CPU models, so every model in the process gets it (peers timed in
    the same process alike). Returns False where the C library is not glibc. The same as the environment
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**30))


def fold_layer_scale(model: nn.Module) -> nn.Module:
    """gamma * (W x + b) == (gamma W) x + gamma b: fold each block's layer scale into pwconv2 (inference only)."""
    for block in model.modules():
        if isinstance(block, Block) and block.gamma is not None:
            with torch.no_grad():
                block.pwconv2.weight.mul_(block.gamma[:, None])
                block.pwconv2.bias.mul_(block.gamma)
            block.gamma = None
    return model


_ZERO, _ONE = [0, 0], [1, 1]
RECOMPILE_LIMIT = 64  # compiled graphs kept per code object (torch's default 8 was hit by compare.py)


class PointwiseConv(torch.autograd.Function):
    """1x1 convolution (B, K, H, W) -> (B, N, H, W) on channels-last input through oneDNN's fused-op entry point.

    `aten.convolution` and `nn.Linear` (MKL sgemm) reach about half of what oneDNN's
    `mkldnn._convolution_pointwise` does on this CPU for these shapes; the backward's grad-input is the same
    kind of convolution with the transposed weight, the grad-weight oneDNN's backward-weights convolution or a
    matmul, whichever `_weight_grad_by_onednn` says is faster for the shape.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ways: Ways) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.ways = ways
        return _conv1x1(x, weight, bias, matmul=ways.forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad, ways = grad.contiguous(memory_format=torch.channels_last), ctx.ways
        grad_x = _conv1x1(grad, weight.t(), None, matmul=ways.grad_input)  # a view: no transposing copy
        return grad_x, *_weight_and_bias_grad(grad, x, weight, ways.grad_weight, ways.grad_weight_transposed), None


class Ways(NamedTuple):
    """How one 1x1 convolution (K -> N channels at a given batch x H x W) runs its products: True = as a matmul
    (MKL, or oneDNN's for bf16) on the channels-last rows, False = as oneDNN's convolution. forward_add and
    grad_input_mul are for `InvertedMlp`'s pwconv2, whose forward adds the shortcut and whose grad-input multiplies
    by GELU'(h): oneDNN does either inside the convolution (a binary post-op), the matmul in a second, in-place pass.
    grad_weight_transposed: the grad-weight matmul as (x^T grad) copied transposed instead of grad^T x (up to 1.3x
    faster here where the (N, K) weight is small enough for the copy to be cheap)."""

    forward: bool
    grad_input: bool
    grad_weight: bool
    forward_add: bool = False
    grad_input_mul: bool = False
    grad_weight_transposed: bool = False


Plan = dict[tuple[str, int, int, int, torch.dtype], bool]  # (product, rows, K, N, dtype) -> the `Ways` field


def _ways(plan: Plan | None, x: torch.Tensor, k: int, n: int) -> Ways:
    """The plan's choices for a 1x1 conv from k to n channels on rows of x (B, ., H, W); without a measurement
    for the shape: oneDNN's convolution, and the grad-weight as `_weight_grad_by_onednn` says."""
    rows, plan = x.shape[0] * x.shape[2] * x.shape[3], plan or {}
    return Ways(
        plan.get(("conv", rows, k, n, x.dtype), False),
        plan.get(("conv", rows, n, k, x.dtype), False),
        plan.get(("grad_weight", rows, k, n, x.dtype), not _weight_grad_by_onednn(n, k, x.dtype)),
        plan.get(("conv_add", rows, k, n, x.dtype), False),
        plan.get(("conv_mul", rows, n, k, x.dtype), False),
        plan.get(("grad_weight_t", rows, k, n, x.dtype), False),
    )


TILED_MIN_BYTES = 8 * 2**20  # the tiled MLP is timed where the 4C-wide hidden tensor is larger than this (cache)


def plan_to_rows(plan: Plan) -> list[list]:
    """The plan as plain data (for a checkpoint): [product, rows, K, N, dtype name, choice] per entry."""
    return [[*key[:4], str(key[4]).removeprefix("torch."), choice] for key, choice in plan.items()]


def plan_from_rows(rows: list[list]) -> Plan:
    """`plan_to_rows` undone."""
    return {(product, r, k, n, getattr(torch, dtype)): bool(choice) for product, r, k, n, dtype, choice in rows}


def _tiled(plan: Plan | None, y: torch.Tensor, c: int, hidden: int) -> bool:
    """Whether the plan measured `InvertedMlp`'s tiled C kernel faster than its separate products for this stage
    (it times it only where the kernel runs; and reading the plan alone keeps compiled graphs whole)."""
    rows = y.shape[0] * y.shape[2] * y.shape[3]
    return (plan or {}).get(("mlp_tiled", rows, c, hidden, y.dtype), False)


def plan_pointwise(model: ConvNeXt, example_input: torch.Tensor, dtype: torch.dtype, runs: int = 3) -> Plan:
    """Time oneDNN's convolution against a matmul for every 1x1 product a training step of `model` makes at this
    input's batch and size, in `dtype` (with pwconv2's fused add / multiply, and the grad-weight both ways round),
    and note the faster of each (the `Ways` of each conv). Which wins depends on the CPU and the shape
    (oneDNN by up to 2x on an AMD core where MKL's fp32 path is narrow; the matmul by up to 1.6x on the late
    stages of an Intel core: benchmarks/NOTES.md), so it is measured, not assumed."""
    plan: Plan = {}
    b, _, height, width = example_input.shape
    gen = torch.Generator().manual_seed(0)  # the caller's RNG stream is left alone
    for i, c in enumerate(model.cfg.dims):
        stride = model.cfg.patch_size * 2 ** (i if len(model.cfg.dims) > 1 else 0)
        h, w = height // stride, width // stride
        if h * w == 0:
            continue
        for k, n in ((c, 4 * c), (4 * c, c)):
            x = torch.randn(b, k, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            g = torch.randn(b, n, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            weight, bias = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype), torch.zeros(n, dtype=dtype)
            if k > n:  # 4C -> C: in training mostly pwconv1's grad-input, on a transposed view of its weight
                weight = weight.t().contiguous().t()
            conv = functools.partial(_conv1x1, x, weight, bias)
            plan[("conv", b * h * w, k, n, dtype)] = _true_is_faster(lambda m, f=conv: f(matmul=m), runs)
            grad = functools.partial(_weight_and_bias_grad, g, x, weight)
            t = _true_is_faster(lambda t, f=grad: f(True, t), runs)
            plan[("grad_weight_t", b * h * w, k, n, dtype)] = t
            plan[("grad_weight", b * h * w, k, n, dtype)] = _true_is_faster(lambda m, f=grad, t=t: f(m, t), runs)
            # pwconv2's forward (4C -> C, + shortcut) and its grad-input (C -> 4C on the transposed weight, x GELU')
            post, other = ("add", g) if k > n else ("mul", g)
            weight = weight.contiguous() if k > n else weight.t().contiguous().t()
            fused = functools.partial(_conv1x1, x, weight, bias, post, other)
            plan[(f"conv_{post}", b * h * w, k, n, dtype)] = _true_is_faster(lambda m, f=fused: f(matmul=m), runs)
        hidden_bytes = b * h * w * 4 * c * 4
        if dtype == torch.float32 and hidden_bytes >= TILED_MIN_BYTES and kernels.tiled_mlp_available():
            # the whole MLP, tiled, against the above
            plan[("mlp_tiled", b * h * w, c, 4 * c, dtype)] = _true_is_faster(_mlp_step(plan, b, c, h, w, gen), runs)
    return plan


def _mlp_step(plan: Plan, b: int, c: int, h: int, w: int, gen: torch.Generator) -> Callable[[bool], object]:
    """run(tiled): a float32 forward + backward of `InvertedMlp` at one stage's shape, with the plan's ways."""
    y, shortcut, grad = (
        torch.randn(b, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(3)
    )
    w1, b1 = torch.randn(4 * c, c, generator=gen) / c**0.5, torch.zeros(4 * c)
    w2, b2 = torch.randn(c, 4 * c, generator=gen) / (4 * c) ** 0.5, torch.zeros(c)
    ways = _ways(plan, y, c, 4 * c), _ways(plan, y, 4 * c, c)

    def run(tiled: bool) -> object:
        _, saved = _mlp_forward(y, w1, b1, w2, b2, shortcut, *ways, tiled)
        return _mlp_backward(grad, *saved, *ways, tiled)

    return run


def _true_is_faster(run: Callable[[bool], object], runs: int) -> bool:
    """Whether run(True) (a matmul, say) takes less time than run(False) (oneDNN), median of `runs` each, timed
    in turns: the first large products of a process run slow for a while (oneDNN 28.9 vs 16.6 ms at T's stage 1),
    and timing one way after the other had picked the wrong one there."""
    with torch.no_grad():
        first, second = _median_seconds([lambda: run(True), lambda: run(False)], runs)
    return first < second


@functools.cache
def onednn_conv1x1(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs a 1x1 convolution in `dtype` on this machine (bf16 needs AVX-512 or AVX-NE-CONVERT);
    where it does not, the pointwise layers run as matmuls, said once in a warning."""
    ok = torch.backends.mkldnn.is_available()
    if ok:
        x = torch.zeros(1, 8, 2, 2, dtype=dtype).contiguous(memory_format=torch.channels_last)
        try:
            torch.ops.mkldnn._convolution_pointwise(x, torch.zeros(8, 8, 1, 1, dtype=dtype), None, _ZERO, _ONE, _ONE,
                                                    1, "none", [], "")  # fmt: skip
        except RuntimeError:
            ok = False
    if not ok:
        warnings.warn(
            f"oneDNN has no {dtype} 1x1 convolution on this CPU: the fast path's pointwise layers run as matmuls",
            stacklevel=2,
        )
    return ok


def _conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    post: str = "",
    other: torch.Tensor | None = None,
    matmul: bool = False,
) -> torch.Tensor:
    """1x1 convolution of channels-last (B, K, H, W) with an (N, K) weight, by oneDNN's convolution, or as a
    matmul on the (BHW, K) rows (`matmul`); post "add"/"mul": `other` (channels-last, like the result) is added to /
    multiplies the result, by oneDNN inside the same kernel (a binary post-op, no extra pass) or, after a matmul,
    in place. `weight` may be a transposed view (the grad-inputs): both take it without a copy, and a transposing
    copy costs as much as the product here."""
    if matmul or (not torch.compiler.is_compiling() and not onednn_conv1x1(x.dtype)):  # compiled: inductor's own
        out = F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)  # channels-last
        if post:
            out = out.add_(other) if post == "add" else out.mul_(other)
        return out
    w = weight[:, :, None, None]
    if post and torch.compiler.is_compiling():  # the binary op has no fake kernel; inductor fuses the two itself
        out = torch.ops.mkldnn._convolution_pointwise(x, w, bias, _ZERO, _ONE, _ONE, 1, "none", [], "")
        return out + other if post == "add" else out * other
    if post:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, w, bias, _ZERO, _ONE, _ONE, 1, post, None, None, [], None
        )
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, _ZERO, _ONE, _ONE, 1, "none", [], "")


def _weight_and_bias_grad(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, matmul: bool, transposed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(loss)/d(weight) (N, K) and d(loss)/d(bias) (N,) of a 1x1 convolution, on channels-last grad and x: the
    weight's as a matmul of the rows (grad^T x, or with `transposed` (x^T grad)^T copied into the (N, K) layout)
    or by oneDNN's backward-weights convolution."""
    grad_2d = _rows(grad)  # (BHW, N)
    if not matmul:
        args = (grad, x, weight[:, :, None, None], None, _ONE, _ZERO, _ONE, False, _ZERO, 1)
        grad_w = torch.ops.aten.convolution_backward(*args, [False, True, False])[1][:, :, 0, 0]
    elif transposed:  # the copy keeps the parameters' layout: a transposed gradient is copied later anyway
        grad_w = (_rows(x).t() @ grad_2d).t().contiguous()
    else:
        grad_w = grad_2d.t() @ _rows(x)  # (N, K)
    return grad_w, _column_sums(grad_2d)


def _column_sums(rows: torch.Tensor) -> torch.Tensor:
    """rows (R, N) summed over R: in float32 as a matrix-vector product with ones, which runs at memory speed here
    (2x `sum(0)`: 50176 x 384 1.45 vs 2.44 ms); other dtypes by `sum`, which accumulates them in float32."""
    if rows.dtype == torch.float32:
        return rows.new_ones(rows.shape[0]) @ rows
    return rows.sum(0)


def _weight_grad_by_onednn(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether oneDNN's backward-weights convolution beats a matmul for the 1x1 conv grad-weight (N, K).

    Measured on the ConvNeXt block shapes (benchmarks/NOTES.md): fp32 matmuls go to MKL, which runs about half
    speed on AMD CPUs, so oneDNN wins (1.05-2.2x); in bf16 both are oneDNN-class and the conv wins only on the
    wide, shallow early stages (min(N, K) <= 96: 1.2-1.4x), the matmul on the rest (1.1-1.5x).
    """
    return dtype == torch.float32 or min(n, k) <= 96


class DepthwiseConv(torch.autograd.Function):
    """Depthwise kxk convolution (stride 1, same padding) with a faster CPU backward than aten's.

    grad-input is the forward convolution of the gradient with the flipped kernel (oneDNN's forward kernel; aten's
    backward-data path is up to 2.5x slower on channels-last input); grad-weight is the C kernel
    `convnext.kernels.depthwise_weight_grad` (3-10x aten's; aten's own when no C compiler is found).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return depthwise_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        k = weight.shape[-1]
        used = _taps_used(x, k)
        grad_x = depthwise_conv(grad, weight.flip(-2, -1), None)
        grad_w = kernels.depthwise_weight_grad(x, grad, used).to(weight.dtype)
        if used < k:  # the outer taps only ever met padding: their gradient is zero
            grad_w = F.pad(grad_w, [(k - used) // 2] * 4)
        return grad_x, grad_w, _column_sums(_rows(grad))


def _taps_used(x: torch.Tensor, k: int) -> int:
    """The central taps of an odd k x k "same" kernel that can meet a pixel of x: at most 2 * side - 1."""
    return min(k, 2 * max(x.shape[-2:]) - 1) if k % 2 == 1 else k


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise k x k "same" convolution on the taps that can meet a pixel: on a grid smaller than the kernel
    (a 7x7 kernel on ConvNeXt's 2x2 and 1x1 late stages at small images) the outer taps only multiply padding,
    and oneDNN's 7x7 kernel on a 1x1 grid is ~200x slower than the 1x1 it equals (benchmarks/NOTES.md)."""
    k = weight.shape[-1]
    used = _taps_used(x, k)
    if used < k:
        cut = (k - used) // 2
        weight = weight[:, :, cut : cut + used, cut : cut + used]
    return F.conv2d(x, weight, bias, padding=used // 2, groups=weight.shape[0])


class LowPrecisionGelu(torch.autograd.Function):
    """Exact GELU whose backward, for bf16/fp16 activations, needs no erf.

    a = h * Phi(h), so Phi(h) = a / h from the output the next 1x1 conv saves anyway, and
    GELU'(h) = Phi(h) + h * phi(h) costs one exp. The erf is what makes GELU's backward compute-bound here: bf16,
    64x160x32x32, 3.8 -> 2.2 ms (benchmarks/NOTES.md). Reading Phi off a bf16 output adds about one bf16 rounding
    to the gradient; fp32 keeps aten's backward (no faster that way).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a = F.gelu(h)
        ctx.save_for_backward(h, a)
        return a

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, a = ctx.saved_tensors
        h32, a32 = h.float(), a.float()
        cdf = torch.where(h32.abs() > 1e-20, a32 / h32, 0.5)
        pdf = torch.exp(-0.5 * h32 * h32) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return (grad.float() * (cdf + h32 * pdf)).to(grad.dtype)


class InvertedMlp(torch.autograd.Function):
    """The block's pwconv1 -> exact GELU -> pwconv2 (-> + shortcut) as one op, for float32 CPU training.

    The forward writes GELU'(h) beside GELU(h) in the same pass (`kernels.gelu_with_grad`) and saves it instead
    of h, so the backward evaluates no erf: grad-input of pwconv2 times GELU'(h) is one oneDNN convolution with a
    multiply post-op. The shortcut, when given, is added by pwconv2 itself (an add post-op). Against the separate
    ops, per 64x160x32x32 activation: 2.0 ms GELU + 4.8 ms GELU backward -> 3.5 ms + ~1 ms in the post-op
    (benchmarks/NOTES.md).
    tiled: forward and backward by the C kernel over tiles of rows in cache (`kernels.mlp_forward`), which the
    plan picks where the separate products are memory-bound (the early stages' small C).
    """

    @staticmethod
    def forward(ctx, y, w1, b1, w2, b2, shortcut, ways1: Ways, ways2: Ways, tiled: bool = False):
        out, saved = _mlp_forward(y, w1, b1, w2, b2, shortcut, ways1, ways2, tiled)
        ctx.save_for_backward(*saved)
        ctx.with_shortcut, ctx.ways = shortcut is not None, (ways1, ways2, tiled)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous(memory_format=torch.channels_last)
        grads = _mlp_backward(grad, *ctx.saved_tensors, *ctx.ways)
        return *grads, grad if ctx.with_shortcut else None, None, None, None


def _mlp_forward(y, w1, b1, w2, b2, shortcut, ways1: Ways, ways2: Ways, tiled: bool):
    """`InvertedMlp`'s forward: (out, the tensors its backward needs: y, w1, GELU(h), GELU'(h), w2)."""
    y = y.contiguous(memory_format=torch.channels_last)
    if shortcut is not None:
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
    if tiled:
        out, a, d = kernels.mlp_forward(_rows(y), w1, b1, w2, b2, None if shortcut is None else _rows(shortcut))
        return _unrows(out, y), (y, w1, a, d, w2)
    a, d = kernels.gelu_with_grad(_conv1x1(y, w1, b1, matmul=ways1.forward))
    if shortcut is None:
        out = _conv1x1(a, w2, b2, matmul=ways2.forward)
    else:
        out = _conv1x1(a, w2, b2, "add", shortcut, matmul=ways2.forward_add)
    return out, (y, w1, a, d, w2)


def _mlp_backward(grad, y, w1, a, d, w2, ways1: Ways, ways2: Ways, tiled: bool):
    """`InvertedMlp`'s backward on channels-last grad: d(loss)/d(y, w1, b1, w2, b2)."""
    if tiled:
        grad_y, *grad_weights = kernels.mlp_backward(_rows(grad), _rows(y), w1, a, d, w2)
        return _unrows(grad_y, y), *grad_weights
    grad_w2, grad_b2 = _weight_and_bias_grad(grad, a, w2, ways2.grad_weight, ways2.grad_weight_transposed)
    grad_h = _conv1x1(grad, w2.t(), None, "mul", d, matmul=ways2.grad_input_mul)  # d(loss)/d(a) * GELU'(h)
    grad_w1, grad_b1 = _weight_and_bias_grad(grad_h, y, w1, ways1.grad_weight, ways1.grad_weight_transposed)
    grad_y = _conv1x1(grad_h, w1.t(), None, matmul=ways1.grad_input)
    return grad_y, grad_w1, grad_b1, grad_w2, grad_b2


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as its (BHW, C) rows: a view when x is channels-last (a copy otherwise)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(BHW, N) rows as channels-last (B, N, H, W), B, H, W those of `like`: a view."""
    b, _, h, w = like.shape
    return rows.view(b, h, w, rows.shape[1]).permute(0, 3, 1, 2)


LAYER_NORM_MAX_C = 192  # `ChannelsLayerNorm` beats aten up to here; from C = 320 on, no faster (NOTES.md row 20)


class ChannelsLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim of (B, H, W, C) rows by the C kernel (`kernels.layer_norm`), for float32 CPU
    training at small C, where aten's backward is slow: 64x32x32 rows of C = 40, forward + backward 6.4 -> 1.8 ms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out, mean, rstd = kernels.layer_norm(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        return *kernels.layer_norm_backward(grad.contiguous(), x, mean, rstd, weight), None


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` over the last dim of (B, H, W, C) x: through `ChannelsLayerNorm` in float32 CPU training at small C."""
    affine = norm.weight is not None and norm.bias is not None
    train = torch.is_grad_enabled() and x.device.type == "cpu"
    if train and _plain_float32(x) and affine and x.shape[-1] <= LAYER_NORM_MAX_C:
        return ChannelsLayerNorm.apply(x, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _stem_or_downsample(layers: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stem or a downsampling layer (a conv and a `LayerNorm2d`, either order), its LayerNorm by `_layer_norm`."""
    for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
        if isinstance(layer, LayerNorm2d):
            x = _layer_norm(layer, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = layer(x)
    return x


def _exact_gelu(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "none"


def _gelu(act: nn.Module, h: torch.Tensor) -> torch.Tensor:
    low = h.dtype in (torch.bfloat16, torch.float16)
    return LowPrecisionGelu.apply(h) if _exact_gelu(act) and low else act(h)


def _cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under CPU autocast, custom ops see no autocasting: cast to its dtype here (autograd casts grads back)."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def block_forward(block: Block, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
    """`Block.forward` with the MLP as 1x1 convolutions on channels-last NCHW, on the block's own parameters.

    CPU training goes through the custom-backward ops above (`DepthwiseConv`, `ChannelsLayerNorm`, `InvertedMlp`, or
    `PointwiseConv` and `LowPrecisionGelu`); everything else through the plain functional ops, which `torch.compile`
    fuses and freezes for inference.
    plan: how each 1x1 product runs in training (`plan_pointwise`); None: oneDNN's convolutions.
    """
    train = torch.is_grad_enabled() and x.device.type == "cpu"
    if train:
        y = DepthwiseConv.apply(*_cast(x, block.dwconv.weight, block.dwconv.bias))
    else:
        y = depthwise_conv(x, block.dwconv.weight, block.dwconv.bias)
    y = _layer_norm(block.norm, y.permute(0, 2, 3, 1))  # (B, H, W, C): a view when x is channels-last
    y = y.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last
    w2, b2 = block.pwconv2.weight, block.pwconv2.bias
    if block.gamma is not None:
        w2, b2 = w2 * block.gamma[:, None], b2 * block.gamma
    if train and _fused_mlp(block, y):
        fuse_shortcut = getattr(block.drop_path, "p", 0.0) == 0.0 or not block.training  # no stochastic depth
        c, hidden = block.pwconv1.weight.shape[::-1]
        ways1, ways2, tiled = _ways(plan, y, c, hidden), _ways(plan, y, hidden, c), _tiled(plan, y, c, hidden)
        shortcut = x if fuse_shortcut else None
        out = InvertedMlp.apply(y, block.pwconv1.weight, block.pwconv1.bias, w2, b2, shortcut, ways1, ways2, tiled)
        return out if fuse_shortcut else x + block.drop_path(out)
    y = _pointwise(y, block.pwconv1.weight, block.pwconv1.bias, train, plan)  # (B, 4C, H, W)
    y = _gelu(block.act, y) if train else block.act(y)
    if not isinstance(block.grn, nn.Identity):
        grn = block.grn
        gx = torch.linalg.vector_norm(y.float(), ord=2, dim=(2, 3), keepdim=True)  # (B, 4C, 1, 1), fp32
        nx = (gx / (gx.mean(dim=1, keepdim=True) + grn.eps)).to(y.dtype)
        y = y + grn.bias[:, None, None] + grn.weight[:, None, None] * (y * nx)
    y = _pointwise(y, w2, b2, train, plan)
    return x + block.drop_path(y)


def _fused_mlp(block: Block, y: torch.Tensor) -> bool:
    """Whether `InvertedMlp` can run this block: float32 (not under autocast), exact GELU, no GRN."""
    return _exact_gelu(block.act) and _plain_float32(y) and isinstance(block.grn, nn.Identity)


def _plain_float32(x: torch.Tensor) -> bool:
    """float32 and not under CPU autocast: where the float32 training kernels (`InvertedMlp`, `ChannelsLayerNorm`)
    apply; bf16 training keeps aten's ops, which `torch.compile` fuses."""
    return x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _pointwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, train: bool, plan: Plan | None
) -> torch.Tensor:
    """A Linear's (N, K) weight as a 1x1 convolution on channels-last (B, K, H, W)."""
    if train:
        x, weight, bias = _cast(x, weight, bias)
        return PointwiseConv.apply(x, weight, bias, _ways(plan, x, *weight.shape[::-1]))
    return F.conv2d(x, weight[:, :, None, None], bias)


class FastConvNeXt(nn.Module):
    """Runs a `ConvNeXt` (held, not copied: same parameters) through `block_forward`, with `plan`'s 1x1 choices."""

    def __init__(self, model: ConvNeXt, plan: Plan | None = None):
        super().__init__()
        self.model = model
        self.plan = plan or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = _stem_or_downsample(m.stem, x)
        for stage in m.stages:
            x = _stem_or_downsample(stage.downsample, x)
            for block in stage.blocks:
                if stage.grad_checkpointing and x.requires_grad:
                    x = checkpoint(block_forward, block, x, self.plan, use_reentrant=False)
                else:
                    x = block_forward(block, x, self.plan)
        return m.forward_head(x)


class Optimized(nn.Module):
    """Takes plain NCHW float input, converts it to what the inner module wants, returns float32 output."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, autocast: bool, device_type: str, freeze: bool = False):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.autocast = autocast
        self.device_type = device_type
        self.freeze = freeze
        self.aot: dict[tuple[int, ...], object] = {}  # input shape -> AOTInductor runner (see `aot_compile`)
        self._aot_dir: tempfile.TemporaryDirectory | None = None

    def aot_compile(self, example: torch.Tensor, eager: nn.Module) -> None:
        """Ahead-of-time compile `eager` for this input shape with AOTInductor (frozen weights, C++ wrapper).

        Calling it skips dynamo's guards and the Python kernel launcher: at batch 1 on a small model those are
        a third of the time. Other shapes keep going through the `torch.compile` path.
        """
        x = example.to(memory_format=torch.channels_last).to(self.dtype)
        self._aot_dir = self._aot_dir or tempfile.TemporaryDirectory(prefix="convnext-aot-")
        path = f"{self._aot_dir.name}/{'x'.join(map(str, x.shape))}.pt2"
        with torch.no_grad():
            program = torch.export.export(eager, (x,))
            with torch._inductor.config.patch(freezing=True):
                package = torch._inductor.aoti_compile_and_package(program, package_path=path)
        self.aot[tuple(x.shape)] = torch._inductor.aoti_load_package(package)

    def keep_aot_if_faster(self, x: torch.Tensor, runs: int = 5) -> None:
        """Time both paths on `x` and drop the AOT runner unless it wins (it does at batch 1, not always at 64)."""
        shape = tuple(x.shape)
        runner = self.aot.pop(shape)
        with torch.inference_mode():
            [compiled] = _median_seconds([lambda: self(x)], runs)
            self.aot[shape] = runner
            if _median_seconds([lambda: self(x)], runs)[0] >= compiled:
                del self.aot[shape]

    def keep_eager_if_faster(self, x: torch.Tensor, runs: int = 3) -> None:
        """Time a training forward + backward through the compiled module and through the module it compiled, and
        keep the faster (float32 CPU training runs eager faster on some machines: benchmarks/NOTES.md).

        The runs accumulate gradients and draw drop-path masks: `optimize` clears and restores those afterwards.
        """
        compiled, eager = self.inner, self.inner._orig_mod
        seconds = {}
        for module in (compiled, eager):
            self.inner = module
            [seconds[module]] = _median_seconds([lambda: self(x).float().sum().backward()], runs)
        self.inner = eager if seconds[eager] < seconds[compiled] else compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(memory_format=torch.channels_last)
        runner = self.aot.get(tuple(x.shape))
        if runner is not None and not torch.is_grad_enabled():
            return runner(x.to(self.dtype)).float()
        # Inductor reads `freezing` when it compiles, i.e. inside the first call for each input shape, and freezes
        # only under no_grad. A scoped patch rather than torch.compile(options=...): that option is read before the
        # options apply, so passing it there silently compiles an unfrozen graph.
        # Dynamo keeps at most `recompile_limit` (8) compiled graphs per code object and then silently runs eager:
        # every optimize()d model, shape and dtype in a process shares FastConvNeXt.forward's code object.
        limits = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
        with (
            limits,
            torch._inductor.config.patch(freezing=self.freeze),
            torch.no_grad() if self.freeze else nullcontext(),
        ):
            if self.autocast:
                with torch.autocast(self.device_type, dtype=self.dtype):
                    out = self.inner(x)
            else:
                out = self.inner(x.to(self.dtype))
        return out.float()


def _median_seconds(calls: list[Callable[[], object]], runs: int) -> list[float]:
    """Median wall time of `runs` calls of each of `calls`, after one untimed call of each (warm-up), taken in turns
    (drift in the machine's speed then falls on all alike)."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, took in zip(calls, times):
            t0 = time.perf_counter()
            call()
            took.append(time.perf_counter() - t0)
    return [sorted(took)[runs // 2] for took in times]


def optimize(
    model: nn.Module,
    mode: str = "inference",
    dtype: torch.dtype = torch.float32,
    example_input: torch.Tensor | None = None,
    compile: bool = True,
    aot: bool = True,
) -> nn.Module:
    """Return a module called like `model` on NCHW float input, holding the fastest path found.

    mode: "inference" works on a frozen copy (the original is untouched); "train" runs the model's own parameters,
        so an optimizer built on `model.parameters()` trains it.
    dtype: torch.float32 or torch.bfloat16 (bf16 weights for CPU inference, autocast otherwise); float16 on CUDA.
    example_input: if given, the path is run once on it, so compilation happens here rather than on first use; for
        CPU training the compiled and the eager path are then timed on it and the faster is kept.
    compile: torch.compile the result (static shapes); False gives the eager channels-last path.
    aot: for CPU inference with an `example_input`, also compile that shape ahead of time with AOTInductor.
    On CPU it also calls `keep_freed_memory()` (process-wide: glibc keeps freed activation buffers).
    """
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    device_type = next(model.parameters()).device.type
    if device_type == "cpu":
        keep_freed_memory()
    if mode == "inference":
        inner = fold_layer_scale(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)
        for p in inner.parameters():
            p.requires_grad_(False)
        use_autocast = dtype != torch.float32 and device_type == "cuda"
        if dtype != torch.float32 and not use_autocast:
            inner = inner.to(dtype)
        eager = FastConvNeXt(inner) if isinstance(inner, ConvNeXt) and usable() else inner
        wrapped = Optimized(torch.compile(eager, dynamic=False) if compile else eager, dtype, use_autocast,
                            device_type, freeze=compile).eval()  # fmt: skip
        if example_input is not None:
            with torch.inference_mode():
                wrapped(example_input)
            if compile and aot and device_type == "cpu":
                wrapped.aot_compile(example_input, eager)
                wrapped.keep_aot_if_faster(example_input)
        return wrapped

    model.to(memory_format=torch.channels_last).train()
    if isinstance(model, ConvNeXt) and usable():
        # float32 only: measured op by op, the bf16 choices did not carry over into the compiled bf16 graph (T step
        # 18.1 -> 13.0 img/s with them), where the rule of `_weight_grad_by_onednn` stays
        measure = example_input is not None and device_type == "cpu" and dtype == torch.float32
        plan = plan_pointwise(model, example_input, dtype) if measure else None
        inner = FastConvNeXt(model, plan)
    else:
        inner = model
    if compile:
        inner = torch.compile(inner, dynamic=False)
    wrapped = Optimized(inner, dtype, dtype != torch.float32, device_type).train()
    if example_input is not None:  # compile now; the model's gradients and the RNG (drop path) are left as they were
        rng = torch.get_rng_state()
        wrapped(example_input).sum().backward()
        if compile and device_type == "cpu":
            wrapped.keep_eager_if_faster(example_input)
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
    return wrapped

"""The fast path's ops: a ConvNeXt block on channels-last NCHW, with custom backwards for CPU training.

- The MLP's two "1x1 convolutions" run as real 1x1 convolutions on channels-last NCHW, using the Linear layers'
  own weights as views. PyTorch sends fp32 `nn.Linear` to MKL's sgemm, which on AMD CPUs takes a slower code path;
  oneDNN's convolution uses the full AVX-512 width, and under `torch.compile` it fuses GELU and the residual add
  into the convolution and prepacks the weights.
- Channels-last end to end: LayerNorm over channels is then a free view (no permute copies).
- Training: the same forward on the model's own parameters, with custom backwards: each 1x1 product on oneDNN or as
  a matmul, as a `Plan` says (`convnext.fast.plan` measures one per shape; without one, oneDNN's convolutions and
  the grad-weight by `_weight_grad_by_onednn`); in float32 the block's MLP as one op (`InvertedMlp`) that saves
  GELU's derivative instead of its input and applies it as a oneDNN post-op (or, where the plan measured it faster,
  runs the whole MLP over tiles of rows in cache in a C kernel), and LayerNorm at small C in a C kernel
  (`ChannelsLayerNorm`); depthwise grad-input as a flipped forward convolution and depthwise grad-weight in a C
  kernel (`convnext.fast.kernels`).
Measured in `benchmarks/NOTES.md`. Why one module of ~500 lines: each op's forward, its custom backward and the
autograd Function tying them are read together (a backward is only checked against its own forward), and the block
that composes them sits below them. A `Plan` is only read here (`plan_ways`, `_tiled`): this module imports neither the
plan's measuring nor the compiler, both of which build on it.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from convnext.fast import kernels
from convnext.model import Block, ConvNeXt, LayerNorm2d

_ZERO, _ONE = [0, 0], [1, 1]


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
        return conv1x1(x, weight, bias, matmul=ways.forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad, ways = grad.contiguous(memory_format=torch.channels_last), ctx.ways
        grad_x = conv1x1(grad, weight.t(), None, matmul=ways.grad_input)  # a view: no transposing copy
        return grad_x, *weight_and_bias_grad(grad, x, weight, ways.grad_weight, ways.grad_weight_transposed), None


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


def plan_ways(plan: Plan | None, x: torch.Tensor, k: int, n: int) -> Ways:
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


def _tiled(plan: Plan | None, y: torch.Tensor, c: int, hidden: int) -> bool:
    """Whether the plan measured `InvertedMlp`'s tiled C kernel faster than its separate products for this stage
    (it times it only where the kernel runs; and reading the plan alone keeps compiled graphs whole)."""
    rows = y.shape[0] * y.shape[2] * y.shape[3]
    return (plan or {}).get(("mlp_tiled", rows, c, hidden, y.dtype), False)


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


def conv1x1(
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


def weight_and_bias_grad(
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
    `convnext.fast.kernels.depthwise_weight_grad` (3-10x aten's; aten's own when no C compiler is found).
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


class ResponseNorm(torch.autograd.Function):
    """GRN (V2) on the rows of a (B, N, C) map (N positions, channels last), with its backward written out.

    y = x * (1 + w * nx) + b with nx = gx / (mean_c gx + eps) and gx each channel's L2 norm over the N positions,
    taken in float32. aten's `linalg.vector_norm` over the positions of such a map is slow on the CPU (13.5 of a
    690 ms V2 atto step per call, 12 calls at 32 px), and autograd's GRN makes ~8 passes over the block's widest
    map; here the forward makes two (the sum of squares, one multiply-add) and the backward three.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        out, gx, d, nx, scale = _response_norm(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, gx, d, nx, scale)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, gx, d, nx, scale = ctx.saved_tensors
        acc = gx.dtype
        grad = grad.contiguous()
        s = (grad.to(acc) * x.to(acc)).sum(1)  # d loss / d scale, per image and channel
        grad_bias = grad.sum((0, 1), dtype=acc).to(weight.dtype)
        grad_weight = (s * nx).sum(0).to(weight.dtype)
        gn = s * weight.to(acc)  # d loss / d nx
        gg = gn / d - (gn * gx).sum(1, keepdim=True) / (d * d * gx.shape[1])  # d loss / d gx
        coef = torch.where(gx > 0, gg / gx.clamp_min(torch.finfo(acc).tiny), 0)  # a channel of zeros: no gradient
        grad_x = torch.addcmul(grad * scale.to(grad.dtype)[:, None], x, coef.to(x.dtype)[:, None])
        return grad_x, grad_weight, grad_bias, None


def _response_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """GRN's output and what its backward needs: the norms gx (B, C), their mean + eps, nx and the scale 1 + w nx."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    gx = (xa * xa).sum(1).sqrt()
    d = gx.mean(1, keepdim=True) + eps
    nx = gx / d
    scale = 1 + weight.to(acc) * nx
    return torch.addcmul(bias.to(x.dtype), x, scale.to(x.dtype)[:, None]), gx, d, nx, scale


def response_norm(grn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """`grn` (model.GRN) on channels-last (B, C, H, W) `y`, on its (B, H*W, C) rows: `ResponseNorm` when
    training, the same forward as plain ops otherwise (what `torch.compile` traces for inference)."""
    b, c, h, w = y.shape
    rows = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view when y is channels-last
    if torch.is_grad_enabled():
        out = ResponseNorm.apply(rows, grn.weight, grn.bias, grn.eps)
    else:
        out = _response_norm(rows, grn.weight, grn.bias, grn.eps)[0]
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


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
        out, saved = mlp_forward(y, w1, b1, w2, b2, shortcut, ways1, ways2, tiled)
        ctx.save_for_backward(*saved)
        ctx.with_shortcut, ctx.ways = shortcut is not None, (ways1, ways2, tiled)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous(memory_format=torch.channels_last)
        grads = mlp_backward(grad, *ctx.saved_tensors, *ctx.ways)
        return *grads, grad if ctx.with_shortcut else None, None, None, None


def mlp_forward(y, w1, b1, w2, b2, shortcut, ways1: Ways, ways2: Ways, tiled: bool):
    """`InvertedMlp`'s forward: (out, the tensors its backward needs: y, w1, GELU(h), GELU'(h), w2)."""
    y = y.contiguous(memory_format=torch.channels_last)
    if shortcut is not None:
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
    if tiled:
        out, a, d = kernels.mlp_forward(_rows(y), w1, b1, w2, b2, None if shortcut is None else _rows(shortcut))
        return _unrows(out, y), (y, w1, a, d, w2)
    a, d = kernels.gelu_with_grad(conv1x1(y, w1, b1, matmul=ways1.forward))
    if shortcut is None:
        out = conv1x1(a, w2, b2, matmul=ways2.forward)
    else:
        out = conv1x1(a, w2, b2, "add", shortcut, matmul=ways2.forward_add)
    return out, (y, w1, a, d, w2)


def mlp_backward(grad, y, w1, a, d, w2, ways1: Ways, ways2: Ways, tiled: bool):
    """`InvertedMlp`'s backward on channels-last grad: d(loss)/d(y, w1, b1, w2, b2)."""
    if tiled:
        grad_y, *grad_weights = kernels.mlp_backward(_rows(grad), _rows(y), w1, a, d, w2)
        return _unrows(grad_y, y), *grad_weights
    grad_w2, grad_b2 = weight_and_bias_grad(grad, a, w2, ways2.grad_weight, ways2.grad_weight_transposed)
    grad_h = conv1x1(grad, w2.t(), None, "mul", d, matmul=ways2.grad_input_mul)  # d(loss)/d(a) * GELU'(h)
    grad_w1, grad_b1 = weight_and_bias_grad(grad_h, y, w1, ways1.grad_weight, ways1.grad_weight_transposed)
    grad_y = conv1x1(grad_h, w1.t(), None, matmul=ways1.grad_input)
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
        ways1, ways2, tiled = plan_ways(plan, y, c, hidden), plan_ways(plan, y, hidden, c), _tiled(plan, y, c, hidden)
        shortcut = x if fuse_shortcut else None
        out = InvertedMlp.apply(y, block.pwconv1.weight, block.pwconv1.bias, w2, b2, shortcut, ways1, ways2, tiled)
        return out if fuse_shortcut else x + block.drop_path(out)
    y = _pointwise(y, block.pwconv1.weight, block.pwconv1.bias, train, plan)  # (B, 4C, H, W)
    y = _gelu(block.act, y) if train else block.act(y)
    if not isinstance(block.grn, nn.Identity):
        y = response_norm(block.grn, y)
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
        return PointwiseConv.apply(x, weight, bias, plan_ways(plan, x, *weight.shape[::-1]))
    return F.conv2d(x, weight[:, :, None, None], bias)


def runs_fast(model: nn.Module) -> bool:
    """Whether `FastConvNeXt` runs `model`: a ConvNeXt with LayerNorms (timm's SimpleNorm models, the zepto_rms
    weights, run as the plain model; said once)."""
    if not isinstance(model, ConvNeXt):
        return False
    if model.cfg.norm_layer != "layernorm":
        warnings.warn(f"the fast path runs LayerNorm models; norm_layer={model.cfg.norm_layer!r} runs the plain "
                      "PyTorch model", stacklevel=2)  # fmt: skip
        return False
    return True


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

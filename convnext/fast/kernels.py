"""The fast path's C kernels, for what aten does slowly on CPU, built on first use with the system's C compiler.

- `depthwise_weight_grad` (`csrc/depthwise.c`): the weight gradient of the 7x7 depthwise convolution, which aten
  computes at a few GFLOP/s on CPU (a tenth of its forward; see `benchmarks/NOTES.md`).
- `gelu_with_grad` (`csrc/mlp.c`): exact GELU and its derivative in one pass, so training can save the derivative
  instead of the pre-activation and never evaluate erf in the backward.
- `mlp_forward` / `mlp_backward` (`csrc/mlp.c`): the block's whole MLP (pwconv1, GELU, pwconv2, + shortcut) and
  its backward over tiles of rows that stay in cache, for the small C of the early stages, where the separate ops
  are memory-bound.
- `layer_norm` / `layer_norm_backward` (`csrc/layernorm.c`): LayerNorm over the channels of channels-last rows,
  whose aten backward is slow for the short rows (small C) of the early stages.
The sources are compiled together with `-O3 -march=native -fopenmp` into one library in a cache folder keyed by the
sources, the flags and the CPU, and loaded with ctypes. OpenMP there is torch's own runtime (the same
`libgomp.so.1`), so it uses torch's threads. Without a compiler, off Linux, or when the build fails, `available()`
is False, one warning says why (`status()` keeps it; runs record it in results.json) and each op falls back to aten;
with CONVNEXT_REQUIRE_KERNELS=1 (CI) that is an error instead. Off-CPU tensors always take aten's path.
CONVNEXT_KERNELS_OFF=depthwise,gelu,layer_norm,mlp (any of them) sends those ops to aten's path: what
`benchmarks/kernel_gains.py` times each kernel's gain on the real jobs with, and a way to rule a kernel out.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).parents[1] / "csrc" / name for name in ("depthwise.c", "mlp.c", "layernorm.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]


def cache_dir() -> Path:
    root = os.environ.get("CONVNEXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "convnext")
    return Path(root) / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's feature flags (a cache shared by different machines stays right)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


REQUIRE = "CONVNEXT_REQUIRE_KERNELS"  # =1: a kernel that cannot be built is an error, not a fallback (CI)


KERNELS = ("depthwise", "gelu", "layer_norm", "mlp")
OFF = "CONVNEXT_KERNELS_OFF"  # a comma-separated subset of KERNELS that runs on aten's path


@functools.cache
def switched_off() -> frozenset[str]:
    """The kernels CONVNEXT_KERNELS_OFF names (read once per process); an unknown name is an error."""
    names = frozenset(n.strip() for n in os.environ.get(OFF, "").split(",") if n.strip())
    if names - set(KERNELS):
        raise ValueError(f"{OFF}={os.environ[OFF]!r}: unknown kernel {sorted(names - set(KERNELS))}; "
                         f"choose from {', '.join(KERNELS)}")  # fmt: skip
    if names:
        log.warning("C kernels switched off by %s: %s (aten runs instead)", OFF, ", ".join(sorted(names)))
    return names


def _library(kernel: str | None = None) -> ctypes.CDLL | None:
    """The built library, or None where it is not there or `kernel` is switched off."""
    return None if kernel is not None and kernel in switched_off() else _build()[0]


def status() -> str:
    """ "built: <library>" or why the C kernels are not there (and aten's kernels run instead), and which are
    switched off."""
    off = switched_off()
    return _build()[1] + (f" ({', '.join(sorted(off))} switched off by {OFF})" if off else "")


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """The kernels' library and a line saying where it is, or None and why not: said once, as a warning."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if platform.system() != "Linux":
        return _unavailable(f"built on Linux only (this is {platform.system()})")
    if compiler is None:
        return _unavailable("no C compiler (cc or gcc) on PATH")
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    target = cache_dir() / f"convnext-{key}.so"
    try:
        if not target.exists():
            log.info("building convnext's C kernels into %s (once per machine and source version)", target)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                cmd = [compiler, *FLAGS, "-o", str(built), *map(str, SOURCES)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    first = " | ".join(done.stderr.strip().splitlines()[:4])
                    return _unavailable(f"{compiler} failed ({first})")
                os.replace(built, target)  # atomic: a concurrent build or reader sees the whole file or none
        lib = ctypes.CDLL(str(target))
    except OSError as e:  # a read-only cache, a noexec mount
        return _unavailable(f"cannot build or load {target} ({e})")
    lib.depthwise_weight_grad.restype = ctypes.c_int
    lib.depthwise_weight_grad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 5 + [ctypes.c_int]
    lib.gelu_with_grad.restype = None
    lib.gelu_with_grad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long]
    lib.layer_norm_rows.restype = None
    lib.layer_norm_rows.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 2 + [ctypes.c_float]
    lib.layer_norm_rows_backward.restype = ctypes.c_int
    lib.layer_norm_rows_backward.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 2
    lib.mlp_tiled_available.restype = ctypes.c_int
    lib.mlp_forward.restype = lib.mlp_backward.restype = ctypes.c_int
    lib.mlp_forward.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long] * 3
    lib.mlp_backward.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_long] * 3
    return lib, f"built: {target}"


def _unavailable(why: str) -> tuple[None, str]:
    if os.environ.get(REQUIRE) == "1":
        raise RuntimeError(f"convnext C kernels unavailable: {why} ({REQUIRE}=1)")
    log.warning("convnext C kernels unavailable: %s; aten's kernels run instead (slower CPU training)", why)
    return None, f"unavailable: {why}"


def available() -> bool:
    """True when the C kernels could be built and loaded on this machine."""
    return _library() is not None


def tiled_mlp_available() -> bool:
    """True when `mlp_forward` / `mlp_backward` run the C kernel (it needs AVX-512); else they are aten's ops."""
    lib = _library("mlp")
    return lib is not None and bool(lib.mlp_tiled_available())


@torch.library.custom_op("convnext::depthwise_weight_grad", mutates_args=())
def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """d(loss)/d(weight) of `conv2d(x, weight, padding=k // 2, groups=C)` given d(loss)/d(output) `grad`.

    x, grad: (B, C, H, W) CPU tensors of one dtype (any layout; float32 or bfloat16, summed in float32); returns
    (C, 1, k, k) float32. Without the C kernel (no compiler), for an even k or another dtype, aten computes it.
    """
    b, c, h, w = x.shape
    lib = _library("depthwise")
    native = x.dtype == grad.dtype and x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu and grad.is_cpu
    if lib is not None and native and kernel_size % 2 == 1 and kernel_size <= 15:
        xs = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): views when the inputs are channels-last
        gs = grad.permute(0, 2, 3, 1).contiguous()
        out = torch.empty(kernel_size, kernel_size, c, dtype=torch.float32)
        bf16 = int(x.dtype == torch.bfloat16)
        if lib.depthwise_weight_grad(xs.data_ptr(), gs.data_ptr(), out.data_ptr(), b, h, w, c, kernel_size, bf16):
            raise MemoryError("convnext: depthwise_weight_grad could not allocate its per-thread buffers")
        return out.permute(2, 0, 1).unsqueeze(1).contiguous()
    x, grad, p = x.float(), grad.float(), kernel_size // 2  # aten's kernel: slower, same result
    weight = x.new_empty(c, 1, kernel_size, kernel_size)
    args = (grad, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], c)
    return torch.ops.aten.convolution_backward(*args, [False, True, False])[1]


@depthwise_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size, dtype=torch.float32)


@torch.library.custom_op("convnext::gelu_with_grad", mutates_args=())
def gelu_with_grad(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(h), GELU'(h)) of the exact (erf) GELU, both shaped, laid out and typed like `h`.

    The C kernel (float32) has an erf within 1.5e-7 of the true one (float32 rounding); without it (no compiler)
    or for other dtypes, aten's erf computes the same two tensors (in float32, then cast).
    """
    dense = h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last)
    h = h if dense else h.contiguous()
    lib = _library("gelu")
    if lib is not None and h.dtype == torch.float32 and h.is_cpu and h.numel() > 0:
        a, d = torch.empty_like(h), torch.empty_like(h)
        lib.gelu_with_grad(h.data_ptr(), a.data_ptr(), d.data_ptr(), h.numel())
        return a, d
    h32 = h.float()
    cdf = 0.5 * (1.0 + torch.erf(h32 * 0.7071067811865476))
    pdf = torch.exp(-0.5 * h32 * h32) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return (h32 * cdf).to(h.dtype), (cdf + h32 * pdf).to(h.dtype)


@gelu_with_grad.register_fake
def _(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(h), torch.empty_like(h)


def _native(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors) and tensors[0].numel() > 0


@torch.library.custom_op("convnext::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of x (..., C): (output, mean, 1 / std), the two per row, shaped (..., 1).

    The C kernel takes contiguous float32; anything else, or no compiler, goes to aten (the same numbers)."""
    lib = _library("layer_norm")
    if lib is None or not _native(x, weight, bias):
        return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
    out, mean, rstd = torch.empty_like(x), x.new_empty(*x.shape[:-1], 1), x.new_empty(*x.shape[:-1], 1)
    rows, c = x.numel() // x.shape[-1], x.shape[-1]
    lib.layer_norm_rows(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), mean.data_ptr(),
                        rstd.data_ptr(), rows, c, eps)  # fmt: skip
    return out, mean, rstd


@layer_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    stats = x.new_empty(*x.shape[:-1], 1)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("convnext::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(loss)/d(x, weight, bias) of `layer_norm` given d(loss)/d(output) `grad` and its saved mean and 1 / std."""
    lib = _library("layer_norm")
    if lib is None or not _native(grad, x, mean, rstd, weight):
        args = (grad, x, [x.shape[-1]], mean, rstd, weight, torch.zeros_like(weight), [True, True, True])
        return torch.ops.aten.native_layer_norm_backward(*args)
    grad_x, grad_w, grad_b = torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)
    rows, c = x.numel() // x.shape[-1], x.shape[-1]
    ptrs = (t.data_ptr() for t in (grad, x, mean, rstd, weight, grad_x, grad_w, grad_b))
    if lib.layer_norm_rows_backward(*ptrs, rows, c):
        raise MemoryError("convnext: layer_norm_backward could not allocate its per-thread partial sums")
    return grad_x, grad_w, grad_b


@layer_norm_backward.register_fake
def _(grad, x, mean, rstd, weight):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _mlp_native(*tensors: torch.Tensor | None) -> bool:
    return tiled_mlp_available() and _native(*(t for t in tensors if t is not None))


@torch.library.custom_op("convnext::mlp_forward", mutates_args=())
def mlp_forward(
    y: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    shortcut: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's MLP on (R, C) rows: (GELU(y w1^T + b1) w2^T + b2 [+ shortcut], a, d), with a = GELU(.) and
    d = GELU'(.) (R, 4C) saved for `mlp_backward`; w1 (4C, C), w2 (C, 4C). The C kernel takes contiguous float32;
    anything else, or no AVX-512, goes to aten (the same numbers within float32 rounding)."""
    if not _mlp_native(y, w1, b1, w2, b2, shortcut):
        a, d = gelu_with_grad(torch.nn.functional.linear(y, w1, b1))
        out = torch.nn.functional.linear(a, w2, b2)
        return (out if shortcut is None else out + shortcut), a, d
    (rows, c), h = y.shape, w1.shape[0]
    out, a, d = y.new_empty(rows, c), y.new_empty(rows, h), y.new_empty(rows, h)
    ptrs = [t.data_ptr() for t in (y, w1, b1, w2, b2)] + [0 if shortcut is None else shortcut.data_ptr()]
    if _library().mlp_forward(*ptrs, out.data_ptr(), a.data_ptr(), d.data_ptr(), rows, c, h):
        raise MemoryError("convnext: mlp_forward could not allocate its transposed weights and tiles")
    return out, a, d


@mlp_forward.register_fake
def _(y, w1, b1, w2, b2, shortcut):
    return y.new_empty(y.shape), y.new_empty(y.shape[0], w1.shape[0]), y.new_empty(y.shape[0], w1.shape[0])


@torch.library.custom_op("convnext::mlp_backward", mutates_args=())
def mlp_backward(
    grad: torch.Tensor, y: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, d: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(loss)/d(y, w1, b1, w2, b2) of `mlp_forward` given d(loss)/d(out) `grad` (R, C) and its saved a and d (the
    shortcut's gradient is `grad` itself)."""
    if not _mlp_native(grad, y, w1, a, d, w2):
        grad_h = (grad @ w2) * d
        return grad_h @ w1, grad_h.t() @ y, grad_h.sum(0), grad.t() @ a, grad.sum(0)
    (rows, c), h = y.shape, w1.shape[0]
    grad_y, grad_w1, grad_b1 = torch.empty_like(y), torch.empty_like(w1), y.new_empty(h)
    grad_w2, grad_b2 = torch.empty_like(w2), y.new_empty(c)
    ptrs = [t.data_ptr() for t in (grad, y, w1, a, d, w2, grad_y, grad_w1, grad_b1, grad_w2, grad_b2)]
    if _library().mlp_backward(*ptrs, rows, c, h):
        raise MemoryError("convnext: mlp_backward could not allocate its per-thread partial sums")
    return grad_y, grad_w1, grad_b1, grad_w2, grad_b2


@mlp_backward.register_fake
def _(grad, y, w1, a, d, w2):
    return (
        torch.empty_like(y),
        torch.empty_like(w1),
        y.new_empty(w1.shape[0]),
        torch.empty_like(w2),
        y.new_empty(y.shape[1]),
    )

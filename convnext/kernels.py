"""Small C kernels for what aten does slowly on CPU, built on first use with the system's C compiler.

`depthwise_weight_grad` is the only one: the weight gradient of the 7x7 depthwise convolution, which aten computes
at a few GFLOP/s on CPU (a tenth of its forward; see `benchmarks/NOTES.md`). The source is `csrc/depthwise.c`; it
is compiled with `-O3 -march=native -fopenmp` into a cache folder keyed by the source, the flags and the CPU, and
loaded with ctypes. OpenMP there is torch's own runtime (the same `libgomp.so.1`), so it uses torch's threads.
Without a compiler, or off Linux, `available()` is False and the op falls back to aten's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "depthwise.c"
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


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    target = cache_dir() / f"depthwise-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                cmd = [compiler, *FLAGS, "-o", str(built), str(SOURCE)]
                if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
                    return None
                os.replace(built, target)  # atomic: a concurrent build or reader sees the whole file or none
        lib = ctypes.CDLL(str(target))
    except OSError:  # a read-only cache, a noexec mount: aten's kernel it is
        return None
    lib.depthwise_weight_grad.restype = ctypes.c_int
    lib.depthwise_weight_grad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 5 + [ctypes.c_int]
    return lib


def available() -> bool:
    """True when the C kernels could be built and loaded on this machine."""
    return _library() is not None


@torch.library.custom_op("convnext::depthwise_weight_grad", mutates_args=())
def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """d(loss)/d(weight) of `conv2d(x, weight, padding=k // 2, groups=C)` given d(loss)/d(output) `grad`.

    x, grad: (B, C, H, W) CPU tensors of one dtype (any layout; float32 or bfloat16, summed in float32); returns
    (C, 1, k, k) float32. Without the C kernel (no compiler), for an even k or another dtype, aten computes it.
    """
    b, c, h, w = x.shape
    lib = _library()
    native = x.dtype == grad.dtype and x.dtype in (torch.float32, torch.bfloat16)
    if lib is not None and native and kernel_size % 2 == 1 and kernel_size <= 15:
        xs = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): views when the inputs are channels-last
        gs = grad.permute(0, 2, 3, 1).contiguous()
        out = torch.empty(kernel_size, kernel_size, c)
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

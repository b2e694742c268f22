"""`optimize()`: wraps a model in the fastest path found (`convnext.fast.ops`), compiled, called like the original.

- Inference: layer scale folded into the last 1x1 conv, weights frozen and prepacked by inductor's `freezing`,
  static shapes, bf16 weights when asked for (LayerNorm accumulates in fp32; GRN computes its norm in fp32), and
  with an example input its shape also compiled ahead of time by AOTInductor where that times faster.
- Training: bf16 autocast, `torch.compile(dynamic=False)` or eager (whichever times faster on the example input),
  with the 1x1 products as `plan_pointwise` measures them in float32.
- The process's allocator keeps freed activation buffers (`keep_freed_memory`): no page faults per step.
- On a torch release the fast path is not tested on, it turns itself off (`usable`) and the plain model runs.
Models other than `ConvNeXt` (the roadmap's ResNet steps, say) get the generic part: channels-last, dtype, compile.
Measured in `benchmarks/NOTES.md`.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import os
import tempfile
import warnings
from contextlib import nullcontext

import torch
import torch._dynamo.config
import torch._inductor.config
from torch import nn

from convnext.fast.ops import FastConvNeXt, runs_fast
from convnext.fast.plan import median_seconds, plan_pointwise
from convnext.model import Block

TESTED_TORCH = ((2, 14), (2, 14))  # the torch releases whose private ops (oneDNN pointwise conv, aten backward
# entry points) the fast path is tested on; on others it turns itself off unless CONVNEXT_FAST_ANY_TORCH=1
RECOMPILE_LIMIT = 64  # compiled graphs kept per code object (torch's default 8 was hit by compare.py)


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
            [compiled] = median_seconds([lambda: self(x)], runs)
            self.aot[shape] = runner
            if median_seconds([lambda: self(x)], runs)[0] >= compiled:
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
            [seconds[module]] = median_seconds([lambda: self(x).float().sum().backward()], runs)
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
        eager = FastConvNeXt(inner) if runs_fast(inner) and usable() else inner
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
    if runs_fast(model) and usable():
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

"""Measure a model's speed and memory, and how close it gets to this machine's measured matmul peak.

Throughput is the median of timed runs after warm-up. Peak memory is the extra memory one iteration needs: on
CUDA `max_memory_allocated`, on CPU the peak resident set size (Linux VmHWM, reset just before the iteration;
`tracemalloc` does not see torch's allocations). The roofline share compares the model's FLOPs per second (2 x
GMACs from `convnext.flops`, x3 for a training step) with a large GEMM timed in the same process and dtype.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_FLOPS_FACTOR = 3  # forward + backward (twice the forward's work), the usual estimate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], warmup: int, runs: int, device: torch.device) -> list[float]:
    """Seconds per call of `fn`, `runs` times, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_blocks(
    fn: Callable[[], object], blocks: int, block_s: float, pause_s: float, device: torch.device, warmup: int = 2
) -> list[float]:
    """Seconds per call of `fn` in each of `blocks` blocks (the caller takes the median): after `warmup` untimed
    calls, each block makes as many calls in a row as fill `block_s` (counted from one more call) and is timed
    whole, then the process sleeps `pause_s`, so every block starts from parked threads and a settled machine
    rather than from whatever ran just before. Time one implementation per process (benchmarks/compare.py): two
    runtimes in one process leave each other's threads spinning, and on few cores the order they run in decides
    the figures."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, round(block_s / max(time.perf_counter() - t0, 1e-9)))
    per_call = []
    for _ in range(blocks):
        time.sleep(pause_s)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - t0) / calls)
    return per_call


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int | None = None, runs: int = 5
) -> float:
    """The best GFLOP/s of an n x n x n matmul in `dtype` (n = 2048 on CPU, 8192 on CUDA): the roof to compare to.

    On CPU the same product is also timed through oneDNN (as a 1x1 convolution) and the faster one counts:
    `torch.mm` in fp32 goes to MKL, which on AMD CPUs runs a narrower code path than the hardware allows.
    """
    from convnext.fast import onednn_conv1x1

    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    with torch.inference_mode():
        best = min(time_runs(lambda: torch.mm(a, b), warmup=2, runs=runs, device=device))
        if device.type == "cpu" and onednn_conv1x1(dtype):  # bf16 needs AVX-512 or AVX-NE-CONVERT
            # n pixels, n channels. A copy, not a view of a.t(): the view has batch stride n, which sends oneDNN
            # down a path at 60% of its speed.
            x = torch.empty(1, n, 32, n // 32, dtype=dtype, memory_format=torch.channels_last)
            x.copy_(a.t().reshape(1, n, 32, n // 32))
            w = b.t().contiguous()[:, :, None, None]
            conv = torch.ops.mkldnn._convolution_pointwise
            one_dnn = lambda: conv(x, w, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")  # noqa: E731
            best = min(best, *time_runs(one_dnn, warmup=2, runs=runs, device=device))
    return 2 * n**3 / best / 1e9


class PeakMemory:
    """Peak extra memory (MB) allocated while the `with` block runs.

    CUDA: the caching allocator's `max_memory_allocated`. CPU: every allocation and free of torch's CPU allocator
    as torch.profiler records them (`profile_memory=True`), summed in time order. Resident set size would not do:
    glibc keeps freed tensors in its heap, so RSS shows the largest heap ever touched, not what was live.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler cpu allocations"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _quiet_stderr():  # kineto prints start/stop banners on stderr
                self.prof.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
            return
        with _quiet_stderr():
            self.prof.stop()
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        self.mb = peak / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ libraries' logging) for the duration; Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class BenchResult:
    model: str
    impl: str  # "fast" (convnext.optimize) or "eager"
    mode: str  # "inference" or "train"
    dtype: str
    batch: int
    img_size: int
    device: str
    threads: int
    channels_last: bool
    compile: bool
    img_per_s: float  # median over timed runs
    latency_ms: float  # median time of one batch
    latency_p90_ms: float
    peak_mem_mb: float  # extra memory of one iteration (see module doc)
    gmacs: float  # per image, forward
    achieved_gflops: float
    matmul_peak_gflops: float  # same dtype, same process
    roofline_share: float  # achieved / matmul peak
    runs: int
    memory_method: str = ""
    grad_checkpointing: dict = field(default_factory=dict)  # train only: the same step with checkpointing

    def as_dict(self) -> dict:
        return asdict(self)


def _inputs(batch: int, img_size: int, in_chans: int, num_classes: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, img_size, img_size, generator=gen).to(device)
    y = torch.randint(0, max(num_classes, 1), (batch,), generator=gen).to(device)
    return x, y


def build_runner(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    impl: str = "fast",
    train: bool = False,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    compile: bool | None = None,
) -> Callable[[], object]:
    """One benchmark iteration as a closure: a forward pass, or a full training step (fwd + bwd + AdamW).

    impl "fast": `convnext.optimize` (channels-last, frozen compiled inference, bf16 as it chooses) and, for
    training, the fused AdamW `convnext train` uses.
    impl "eager": the model as is, with optional channels_last, torch.compile and autocast to `dtype`.
    `train` steps modify `model`'s weights: pass a copy you can spare.
    """
    compile = (impl == "fast") if compile is None else compile
    if impl == "fast":
        from convnext.fast import optimize

        net = optimize(model, mode="train" if train else "inference", dtype=dtype, example_input=x, compile=compile)
        autocast = False  # optimize() converts what it needs
    elif impl == "eager":
        net = model.train(train)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if compile:
            net = torch.compile(net, dynamic=False)
        autocast = dtype != torch.float32
    else:
        raise ValueError(f"impl must be 'fast' or 'eager', got {impl!r}")

    return iteration(net, model, x, y, train, dtype, autocast, fused_adamw=impl == "fast")


def iteration(
    net: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train: bool,
    dtype: torch.dtype,
    autocast: bool,
    fused_adamw: bool = False,
) -> Callable[[], object]:
    """`net`'s forward on `x` under inference mode, or a full training step (forward, cross-entropy on `y`,
    backward, AdamW on `model`'s trainable parameters), with autocast to `dtype` if `autocast`.

    fused_adamw: torch's fused AdamW kernel (what `convnext train` builds) instead of its default (the
    multi-tensor "foreach" one, what timm's and torchvision's training scripts build): ConvNeXt-T's step takes
    15 instead of 51 ms on 2 CPU cores."""
    device_type = x.device.type
    if not train:

        def infer() -> object:
            with torch.inference_mode(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                return net(x)

        return infer

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused_adamw or None)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            out = net(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def benchmark(
    model: nn.Module,
    name: str = "model",
    batch: int = 16,
    img_size: int = 224,
    dtype: str = "fp32",
    impl: str = "fast",
    train: bool = False,
    channels_last: bool = False,
    compile: bool | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    runs: int = 10,
    grad_checkpointing: bool = True,
    matmul_n: int | None = None,
) -> BenchResult:
    """Time `model` (a plain ConvNeXt or any classifier) and return a BenchResult.

    train: time a full training step; with `grad_checkpointing` the step is measured again with
        `set_grad_checkpointing(True)` and its time and peak memory land in `result.grad_checkpointing`.
    matmul_n: size of the peak-measuring GEMM (default: 2048 CPU, 8192 CUDA).
    """
    from convnext.flops import count_gmacs, in_chans_of

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    tdtype = DTYPES[dtype]
    model = copy.deepcopy(model)  # training steps and memory-format changes must not touch the caller's model
    in_chans = in_chans_of(model)
    gmacs = count_gmacs(model, img_size, in_chans)
    peak = matmul_peak_gflops(tdtype, device, matmul_n)
    model = model.to(device)
    x, y = _inputs(batch, img_size, in_chans, getattr(model, "num_classes", 1000), device)

    run = build_runner(model, x, y, impl, train, tdtype, channels_last, compile)
    times = time_runs(run, warmup, runs, device)
    lat = statistics.median(times)
    ckpt_run = None
    if train and grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        ckpt_run = build_runner(model, x, y, impl, train, tdtype, channels_last, compile)
        ck_lat = statistics.median(time_runs(ckpt_run, warmup, runs, device))

    # Memory last (the profiler slows things down), gradients freed first so the step allocates them.
    ckpt = {}
    if ckpt_run is not None:
        model.zero_grad(set_to_none=True)
        with PeakMemory(device) as ck_mem:
            ckpt_run()
        model.set_grad_checkpointing(False)
    model.zero_grad(set_to_none=True)
    with PeakMemory(device) as mem:
        run()
    if ckpt_run is not None:
        ckpt = {
            "img_per_s": batch / ck_lat,
            "latency_ms": 1e3 * ck_lat,
            "peak_mem_mb": ck_mem.mb,
            "time_ratio": ck_lat / lat,  # > 1: slower
            "memory_ratio": ck_mem.mb / mem.mb if mem.mb > 0 else float("nan"),  # < 1: less memory
        }
    img_s = batch / lat
    achieved = img_s * 2 * gmacs * (TRAIN_FLOPS_FACTOR if train else 1)
    return BenchResult(
        model=name,
        impl=impl,
        mode="train" if train else "inference",
        dtype=dtype,
        batch=batch,
        img_size=img_size,
        device=str(device),
        threads=torch.get_num_threads(),
        channels_last=channels_last or impl == "fast",
        compile=(impl == "fast") if compile is None else compile,
        img_per_s=img_s,
        latency_ms=1e3 * lat,
        latency_p90_ms=1e3 * statistics.quantiles(times, n=10)[-1] if len(times) > 1 else 1e3 * lat,
        peak_mem_mb=mem.mb,
        gmacs=gmacs,
        achieved_gflops=achieved,
        matmul_peak_gflops=peak,
        roofline_share=achieved / peak,
        runs=runs,
        memory_method=mem.method,
        grad_checkpointing=ckpt,
    )


def format_result(r: BenchResult) -> str:
    """A few human-readable lines."""
    what = f"{r.model} {r.mode} {r.dtype} batch {r.batch} at {r.img_size}px on {r.device} ({r.threads} threads)"
    how = f"impl {r.impl}, channels_last {r.channels_last}, compile {r.compile}"
    lines = [
        what,
        f"  {how}",
        f"  throughput   {r.img_per_s:.1f} img/s (median of {r.runs})",
        f"  latency      {r.latency_ms:.1f} ms per batch (p90 {r.latency_p90_ms:.1f} ms)",
        f"  peak memory  {r.peak_mem_mb:.0f} MB ({r.memory_method})",
        f"  compute      {r.achieved_gflops:.1f} GFLOP/s = {100 * r.roofline_share:.0f}% of the measured "
        f"{r.dtype} matmul peak {r.matmul_peak_gflops:.1f} GFLOP/s ({r.gmacs:.4g} GMACs/img)",
    ]
    if r.grad_checkpointing:
        g = r.grad_checkpointing
        lines.append(
            f"  grad ckpt    {g['img_per_s']:.1f} img/s, {g['peak_mem_mb']:.0f} MB peak: "
            f"{100 * (g['time_ratio'] - 1):+.0f}% time, {100 * (g['memory_ratio'] - 1):+.0f}% memory"
        )
    return "\n".join(lines)

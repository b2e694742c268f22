"""Where a training step of `convnext.optimize(mode="train")` spends its time, by kind of work.

Issue 15 asks, where a speed target is out of reach, for the profile that bounds it. This runs the step
`benchmarks/compare.py` times for "ours" (optimize in train mode, fused AdamW) under `torch.profiler`, with
inductor's per-kernel profiling on, and sums each op's self time into a few kinds: the 1x1 products (oneDNN's
convolutions and the matmuls), the other convolutions (stem, downsampling, the oneDNN grad-weights), the depthwise
convolution and its weight gradient, the code inductor generated (LayerNorm, GELU, casts: named from the kernel),
and the rest. It also prints the 1x1 products' rate against the machine's measured matmul peak.

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --model convnext_tiny --batch 16 --img-size 224 --dtype bf16

Timings need an idle machine; the profiler itself adds a few percent (its total is above the median step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

from convnext import create_model
from convnext.bench import iteration, matmul_peak_gflops
from convnext.fast import optimize
from convnext.flops import count_gmacs

MATMULS = {"mkldnn::_convolution_pointwise", "aten::mm", "aten::addmm", "mkl::_mkl_linear"}
CONVOLUTIONS = {"aten::mkldnn_convolution", "aten::convolution_backward", "mkldnn::_convolution_pointwise"}


def kind(name: str, shapes: list) -> str:
    """The kind of work one profiler row is (see the module docstring)."""
    if name.startswith("graph_"):  # a kernel inductor generated, named after the ops it fused
        part = "GELU backward" if "exp" in name else "GELU forward" if "gelu" in name else None
        part = part or ("LayerNorm backward" if "backward" in name else "LayerNorm forward, casts" if "norm" in name
                        else "casts and other fused")  # fmt: skip
        return f"generated: {part}"
    if "depthwise" in name:
        return "depthwise weight gradient (C kernel)"
    if name.startswith("convnext::"):  # the float32 path's other C kernels (LayerNorm, the tiled MLP)
        return f"C kernel: {name.split('::')[1]}"
    if name == "mkldnn::_convolution_pointwise_":  # in place: a binary post-op writing into its other operand
        name = name[:-1]
    # the weight's shape: (input, weight, ...), (input, other, weight, ...) for a binary post-op, or
    # (grad, input, weight, ...) for a backward
    binary = len(shapes) > 2 and len(shapes[2]) == 4
    weight = shapes[2] if binary or name == "aten::convolution_backward" else shapes[1] if len(shapes) > 1 else []
    if name in CONVOLUTIONS and len(weight) == 4:
        if weight[1] == 1:
            return "depthwise convolution (oneDNN)"
        if weight[2:] != [1, 1]:
            return "stem and downsampling convolutions"
        return "1x1 products" if name == "mkldnn::_convolution_pointwise" else "1x1 grad-weight (oneDNN)"
    if name in MATMULS:
        return "1x1 products"
    if name.startswith("## Call CompiledFxGraph"):
        return "compiled graphs' Python wrapper"
    if name == "aten::copy_":
        return "copies"
    if "adamw" in name.lower():
        return "optimizer"
    return "other"


def profile_step(model: str, batch: int, img_size: int, dtype: torch.dtype, steps: int, compile: bool) -> dict:
    """Median step time and the per-kind self times (ms per step) of `steps` profiled steps."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = create_model(model, num_classes=1000)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 1000, (batch,))
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        fast = optimize(net, mode="train", dtype=dtype, example_input=x, compile=compile)
        step = iteration(fast, net, x, y, True, dtype, False, fused_adamw=True)
        for _ in range(2):
            step()
        seconds = []
        for _ in range(max(steps, 3)):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
    kinds: Counter[str] = Counter()
    for row in prof.key_averages(group_by_input_shape=True):
        kinds[kind(row.key, row.input_shapes)] += row.self_cpu_time_total / 1e3 / steps
    return {
        "step_ms": 1e3 * statistics.median(seconds),
        "kinds_ms": dict(kinds.most_common()),
        "train_flops": 3 * 2e9 * count_gmacs(net, img_size) * batch,  # forward, grad-input, grad-weight
        "pointwise_train_flops": 3 * 2 * pointwise_macs(net, img_size) * batch,
    }


def pointwise_macs(net: torch.nn.Module, img_size: int) -> int:
    """Multiply-adds per image of the blocks' 1x1 layers (`pwconv1`, `pwconv2`), from one forward with hooks."""
    macs = []

    def count(layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        macs.append(inputs[0].numel() // inputs[0].shape[-1] * layer.weight.numel())

    hooks = [m.register_forward_hook(count) for n, m in net.named_modules() if n.endswith(("pwconv1", "pwconv2"))]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, img_size, img_size))
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    return sum(macs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (the median step is timed apart)")
    p.add_argument("--no-compile", action="store_true", help="profile the eager fast path")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    r = profile_step(args.model, args.batch, args.img_size, dtype, args.steps, not args.no_compile)
    total = sum(r["kinds_ms"].values())
    print(f"{args.model} batch {args.batch} at {args.img_size}, {args.dtype}, {torch.get_num_threads()} threads: "
          f"median step {r['step_ms']:.1f} ms ({args.batch / r['step_ms'] * 1e3:.2f} img/s); profiled self time "
          f"{total:.1f} ms per step")  # fmt: skip
    print("| kind | ms per step | share |\n|---|---|---|")
    for name, ms in r["kinds_ms"].items():
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.1f}% |")
    if not args.no_peak:
        peak = matmul_peak_gflops(dtype, torch.device("cpu"), None)
        products = r["kinds_ms"].get("1x1 products", 0.0) + r["kinds_ms"].get("1x1 grad-weight (oneDNN)", 0.0)
        rate = r["pointwise_train_flops"] / products / 1e6 if products else 0.0
        roof = args.batch / (r["train_flops"] / peak / 1e9)  # img/s if every FLOP of the step ran at the peak
        ips = args.batch / r["step_ms"] * 1e3
        print(f"matmul peak {peak:.0f} GFLOP/s: the 1x1 products ({r['pointwise_train_flops'] / 1e9:.0f} of the "
              f"step's {r['train_flops'] / 1e9:.0f} GFLOP) ran at {rate:.0f} GFLOP/s ({100 * rate / peak:.0f}% of "
              f"the peak); all at the peak: {roof:.2f} img/s, {100 * ips / roof:.0f}% of it reached")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a training step of `convnext.optimize(mode="train")`, or its inference, spends its time, by kind of work.

Issue 15 asks, where a speed target is out of reach, for the profile that bounds it. This runs the step
`benchmarks/compare.py` times for "ours" (optimize in train mode, fused AdamW) under `torch.profiler`, with
inductor's per-kernel profiling on, and sums each op's self time into a few kinds: the 1x1 products (oneDNN's
convolutions and the matmuls), the other convolutions (stem, downsampling, the oneDNN grad-weights), the depthwise
convolution and its weight gradient, the code inductor generated (LayerNorm, GELU, casts: named from the kernel),
and the rest. It also prints the 1x1 products' rate against the machine's measured matmul peak.

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --model convnext_tiny --batch 16 --img-size 224 --dtype bf16

`--mode infer` profiles the forward pass compare.py times for "ours" in its infer and latency modes instead
(`optimize(mode="inference")` under `torch.inference_mode`; batch 1 fp32 is its latency_fp32 case):

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --mode infer --batch 1 --dtype fp32

`--onnx` profiles onnxruntime instead (ORT_ENABLE_ALL, CPU provider, torch's thread count, threads parked between
calls, as `compare.py --wait passive` runs it) on three files of the same weights: our export traced at --batch
(what compare.py times), ours with a dynamic batch, and timm's (`timm.utils.onnx.onnx_export`, dynamic batch); ORT's
own profiler (`enable_profiling`) gives each node's time, summed here by op type (Conv split into depthwise and the
others), with the node counts of the graph ORT ran. Beside `--mode infer` at the same batch and threads, it shows
kind by kind where ours and ORT differ (issue 41). Run it in a process of its own: two runtimes' thread pools in one
process slow each other (benchmarks/NOTES.md).

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --onnx --batch 1

Timings need an idle machine; the profiler itself adds a few percent (its total is above the median step).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from convnext import create_model
from convnext.bench import iteration, matmul_peak_gflops
from convnext.fast import optimize
from convnext.flops import count_gmacs

MATMULS = {"mkldnn::_convolution_pointwise", "aten::mm", "aten::addmm", "mkl::_mkl_linear"}
CONVOLUTIONS = {"aten::mkldnn_convolution", "aten::convolution_backward", "mkldnn::_convolution_pointwise"}
EAGER = {"aten::native_layer_norm": "eager: LayerNorm", "aten::gelu": "eager: GELU"}  # the uncompiled path's ops


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
    if name in EAGER:
        return EAGER[name]
    if name.startswith("aoti_torch_cpu_"):  # an AOTInductor call: no shapes recorded (--no-aot splits these)
        if "pointwise_binary" in name:  # a binary post-op: the 1x1 conv adding the residual
            return "1x1 products"
        if "convolution" in name:
            return "AOT convolutions: depthwise, 1x1 (fc1, GELU), stem and downsampling"
        return "AOT linear (head)" if "linear" in name else "AOT other"
    if name == "aten::_slow_conv2d_forward":  # torch's own (not oneDNN) convolution: (input, weight, ...)
        return "1x1 products" if len(shapes) > 1 and shapes[1][2:] == [1, 1] else "stem and downsampling convolutions"
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


def profile_step(
    model: str,
    batch: int,
    img_size: int,
    dtype: torch.dtype,
    steps: int,
    compile: bool,
    mode: str = "train",
    aot: bool = True,
) -> dict:
    """Median step time and the per-kind self times (ms per step) of `steps` profiled steps; mode "train" is a
    training step, "infer" a forward pass of `optimize(mode="inference")` under inference mode (with `aot`, the
    AOTInductor path compare.py times; without, torch.compile's, whose calls carry their shapes)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    train = mode == "train"
    torch.manual_seed(0)
    net = create_model(model, num_classes=1000)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 1000, (batch,))
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        if train:
            fast = optimize(net, mode="train", dtype=dtype, example_input=x, compile=compile)
        else:  # as compare.py's "ours" in its infer and latency modes (optimize casts to dtype itself)
            fast = optimize(net.eval(), mode="inference", dtype=dtype, example_input=x, compile=compile, aot=aot)
        step = iteration(fast, net, x, y, train, dtype, False, fused_adamw=True)
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
    passes = 3 if train else 1  # forward, grad-input, grad-weight
    # optimize keeps the AOTInductor runner only where it timed faster than torch.compile's path
    path = "train" if train else "eager" if not compile else "AOTInductor" if fast.aot else "torch.compile"
    return {
        "path": path,
        "step_ms": 1e3 * statistics.median(seconds),
        "kinds_ms": dict(kinds.most_common()),
        "train_flops": passes * 2e9 * count_gmacs(net, img_size) * batch,  # the step's FLOPs (forward only: infer)
        "pointwise_train_flops": passes * 2 * pointwise_macs(net, img_size) * batch,
    }


def onnx_files(model: str, batch: int, img_size: int, folder: Path) -> dict[str, Path]:
    """Our export (traced at `batch`, as compare.py makes it; and with a dynamic batch) and timm's export of the
    same random weights, written into `folder`."""
    import warnings

    from timm.utils.onnx import onnx_export

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # benchmarks/ is not a package
    from compare import ModelCase, peer_model

    from convnext.export import export_model

    torch.manual_seed(0)
    net = create_model(model, num_classes=1000).eval()
    with torch.no_grad():  # trained weights have no zero bias for the exporter to fold away; random init has
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    files = {
        "ours": folder / "ours.onnx",
        "ours, dynamic batch": folder / "ours-dyn.onnx",
        "timm": folder / "timm.onnx",
    }
    export_model(net, "onnx", files["ours"], img_size=img_size, batch_size=batch)
    export_model(net, "onnx", files["ours, dynamic batch"], img_size=img_size, batch_size=batch, dynamic_batch=True)
    timm_net = peer_model("timm", ModelCase(model, model, img_size, batch, model, None), net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter timm calls is deprecated
        onnx_export(timm_net, str(files["timm"]), example_input=torch.randn(batch, 3, img_size, img_size), check=False)
    return files


def onnx_kind(op: str, input_shapes: list[dict]) -> str:
    """An ORT profile node's kind: its op type, a Conv split by its weight (input 1): depthwise or k x k."""
    if op != "Conv" or len(input_shapes) < 2:
        return op
    weight = next(iter(input_shapes[1].values()))  # {"float": [O, I/groups, kh, kw]}
    return "Conv depthwise" if weight[1] == 1 else f"Conv {weight[2]}x{weight[3]}"


def profile_onnx(path: Path, batch: int, img_size: int, runs: int) -> dict:
    """onnxruntime on the file at `path` as `compare.py --wait passive` runs it, profiled by ORT: the median
    profiled run (ms) and, per kind (`onnx_kind`), the nodes and their summed time (ms per run) over the last
    `runs` of `runs` + 2."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size),
                                                                                    dtype=np.float32)}  # fmt: skip
    for _ in range(runs + 2):  # the first two warm up
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-runs:]
    start = calls[0]["ts"]
    ms: Counter[str] = Counter()
    nodes: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            k = onnx_kind(e["args"]["op_name"], e["args"].get("input_type_shape", []))
            ms[k] += e["dur"] / 1e3 / runs
            nodes.setdefault(k, set()).add(e["name"])
    return {
        "run_ms": statistics.median(e["dur"] / 1e3 for e in calls),
        "kinds_ms": dict(ms.most_common()),
        "nodes": {k: len(v) for k, v in nodes.items()},
    }


def print_onnx(model: str, batch: int, img_size: int, runs: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="profile-onnx-"))
    try:
        files = onnx_files(model, batch, img_size, folder)
        results = {name: profile_onnx(path, batch, img_size, runs) for name, path in files.items()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"onnxruntime, {model} batch {batch} at {img_size}, fp32, {torch.get_num_threads()} threads, {runs} "
          "profiled runs: " + "; ".join(f"{n} {r['run_ms']:.2f} ms per run" for n, r in results.items()))  # fmt: skip
    names = list(results)
    kinds = sorted(
        {k for r in results.values() for k in r["kinds_ms"]}, key=lambda k: -results[names[0]]["kinds_ms"].get(k, 0)
    )
    print("| kind | " + " | ".join(f"{n}: nodes | ms" for n in names) + " |\n|---" + "|---|---" * len(names) + "|")
    for k in kinds:
        cells = [f"{r['nodes'].get(k, 0)} | {r['kinds_ms'].get(k, 0.0):.2f}" for r in results.values()]
        print(f"| {k} | " + " | ".join(cells) + " |")
    totals = [f"{sum(r['nodes'].values())} | {sum(r['kinds_ms'].values()):.2f}" for r in results.values()]
    print("| total | " + " | ".join(totals) + " |")


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
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default bf16 (fp32 with --onnx)")
    p.add_argument("--mode", choices=("train", "infer"), default=None, help="a training step (default) or a forward")
    p.add_argument("--onnx", action="store_true", help="profile onnxruntime on our and timm's export (fp32 forward)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (the median step is timed apart)")
    p.add_argument("--no-compile", action="store_true", help="profile the eager fast path")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak")
    p.add_argument("--no-aot", action="store_true", help="--mode infer: torch.compile's path, not AOTInductor's "
                   "(same kernels; their shapes are recorded, so the convolutions split by kind)")  # fmt: skip
    args = p.parse_args(argv)
    for flag in ("batch", "img_size", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.onnx:
        if args.mode == "train" or args.dtype == "bf16":
            p.error("--onnx profiles an fp32 forward pass: it takes neither --mode train nor --dtype bf16")
        print_onnx(args.model, args.batch, args.img_size, args.steps)
        return 0
    args.mode, args.dtype = args.mode or "train", args.dtype or "bf16"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    compile = not args.no_compile
    r = profile_step(args.model, args.batch, args.img_size, dtype, args.steps, compile, args.mode, not args.no_aot)
    total = sum(r["kinds_ms"].values())
    what = "training step" if args.mode == "train" else f"forward (inference mode, {r['path']} path)"
    print(f"{args.model} {what}, batch {args.batch} at {args.img_size}, {args.dtype}, {torch.get_num_threads()} "
          f"threads: median {r['step_ms']:.1f} ms ({args.batch / r['step_ms'] * 1e3:.2f} img/s); profiled self time "
          f"{total:.1f} ms per call")  # fmt: skip
    print("| kind | ms per step | share |\n|---|---|---|")
    for name, ms in r["kinds_ms"].items():
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.1f}% |")
    if r["path"] == "AOTInductor" and not args.no_peak:  # fc1's convolutions are not told apart from the others
        print("the 1x1 products' rate needs their shapes, which AOTInductor's calls do not record: see --no-aot")
    elif not args.no_peak:
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

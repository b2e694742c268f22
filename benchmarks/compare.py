"""Our ConvNeXt against timm, torchvision and onnxruntime: one process, same inputs, same weights, same threads.

    python benchmarks/compare.py                      # everything (tens of minutes on 2 CPU cores: compiles)
    python benchmarks/compare.py --models atto --modes infer_fp32,latency_fp32
    python benchmarks/compare.py --quick              # a tiny smoke run of the whole pipeline (numbers meaningless)
    python benchmarks/compare.py --json               # stdout: one JSON object {"model/mode/impl": img/s}

Implementations: ours = `convnext.optimize` (what `convnext bench` runs), timm eager (channels_last) and
torch.compile'd, torchvision eager, onnxruntime on our fp32 ONNX export. Every implementation gets the same
weights (converted from ours through `convnext.weights.from_ours`) and the outputs are checked to agree before
anything is timed. Modes: inference fp32/bf16 at the model's batch, batch-1 latency fp32/bf16, one training step
(fwd + bwd + AdamW) fp32 and bf16 autocast; ours steps torch's fused AdamW (as `convnext train` does), the peers
torch's default AdamW (as timm's and torchvision's training scripts do). Timing interleaves the implementations
round by round, so drift hits all alike; each figure is the median over every timed iteration.

Writes `<out>/compare-<time>.md` (the table, the machine, the matmul peaks measured in this run and the
agreement check), `.json` (everything) and `.png` (speed relative to the best peer).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch._dynamo.config
from torch import nn


@dataclass(frozen=True)
class ModelCase:
    key: str
    arch: str  # our registry name
    img_size: int
    batch: int
    timm: str | None
    torchvision: str | None


CASES = {
    "tiny": ModelCase("tiny", "convnext_tiny", 224, 16, "convnext_tiny", "convnext_tiny"),
    "atto": ModelCase("atto", "convnext_atto", 128, 64, "convnext_atto", None),  # torchvision has no atto
}
QUICK = {  # the same pipeline on toy sizes, to prove it runs; never report these numbers
    "tiny": ModelCase("tiny", "convnext_tiny", 32, 2, "convnext_tiny", "convnext_tiny"),
    "atto": ModelCase("atto", "convnext_atto", 32, 4, "convnext_atto", None),
}
MODES = ("infer_fp32", "infer_bf16", "latency_fp32", "latency_bf16", "train_fp32", "train_bf16")
IMPLS = ("ours", "timm_eager", "timm_compiled", "torchvision", "onnxruntime")
LABELS = {
    "ours": "ours (optimize)",
    "timm_eager": "timm eager CL",
    "timm_compiled": "timm compiled",
    "torchvision": "torchvision eager",
    "onnxruntime": "onnxruntime",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ building runners


def peer_model(impl: str, case: ModelCase, ours: nn.Module) -> nn.Module:
    """timm's or torchvision's ConvNeXt holding our weights (converted to their layout)."""
    from convnext.weights import from_ours

    if impl.startswith("timm"):
        import timm

        model, layout = timm.create_model(case.timm, pretrained=False), "timm"
    else:
        import torchvision

        model, layout = getattr(torchvision.models, case.torchvision)(weights=None), "torchvision"
    sd = from_ours(ours.state_dict(), layout)
    target = model.state_dict()
    model.load_state_dict({k: v.reshape(target[k].shape) for k, v in sd.items()})
    return model


def make_runner(
    impl: str, case: ModelCase, ours: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, workdir: Path
) -> Callable[[], object] | None:
    """A closure running one iteration of `mode` through `impl`, warmed up (compiled); None if not applicable."""
    from convnext.bench import iteration
    from convnext.fast import optimize

    kind, dt = mode.split("_")
    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    train = kind == "train"
    if impl == "onnxruntime":
        return None if (train or dt != "fp32") else _onnx_runner(ours, x, workdir / f"{case.key}-b{len(x)}.onnx")
    if impl == "torchvision" and case.torchvision is None:
        return None

    model = copy.deepcopy(ours) if impl == "ours" else peer_model(impl, case, ours).to(x.device)
    autocast = dtype != torch.float32
    if impl == "ours":
        net = optimize(model, mode="train" if train else "inference", dtype=dtype, example_input=x)
        autocast = False  # optimize() handles the dtype itself
    else:
        model.train(train)
        if impl.startswith("timm"):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        net = torch.compile(model, dynamic=False) if impl == "timm_compiled" else model
    # ours trains with the fused AdamW `convnext train` builds; peers with torch's default AdamW, what timm's and
    # torchvision's training scripts build
    return iteration(net, model, x, y, train, dtype, autocast, fused_adamw=impl == "ours")


def _onnx_runner(ours: nn.Module, x: torch.Tensor, path: Path) -> Callable[[], object]:
    import onnxruntime as ort

    from convnext.export import export_model

    if not path.exists():
        export_model(ours, "onnx", path, img_size=x.shape[-1], batch_size=len(x))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: session.run(None, feed)[0]


# ------------------------------------------------------------------------------------------ measuring


def matmul_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    from convnext.bench import matmul_peak_gflops

    n = 512 if quick else None
    return {d: matmul_peak_gflops(getattr(torch, t), device, n) for d, t in (("fp32", "float32"), ("bf16", "bfloat16"))}


def agreement(runners: dict[str, Callable[[], object]], reference: np.ndarray) -> dict[str, float]:
    """max |output - our eager fp32 output| per implementation (inference runners)."""
    out = {}
    for impl, run in runners.items():
        got = run()
        got = got.float().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float32)
        out[impl] = float(np.abs(got - reference).max())
    return out


def time_interleaved(
    runners: dict[str, Callable[[], object]], rounds: int, round_s: float, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per iteration for each runner: `rounds` rounds, each runner timed for >= round_s per round."""
    from convnext.bench import sync

    per_round = {}
    for impl, run in runners.items():  # one more warm-up call each, and how many calls fill a round
        t0 = time.perf_counter()
        run()
        sync(device)
        per_round[impl] = max(1, math.ceil(round_s / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    for _ in range(rounds):
        for impl, run in runners.items():
            for _ in range(per_round[impl]):
                t0 = time.perf_counter()
                run()
                sync(device)
                times[impl].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------ reporting


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# ConvNeXt: ours vs peers ({meta['machine']}, {meta['threads']} threads, torch {meta['torch']})",
        "",
        f"Matmul peak measured in this run: {meta['peak_gflops']['fp32']:.0f} GFLOP/s fp32, "
        f"{meta['peak_gflops']['bf16']:.0f} GFLOP/s bf16. Cells: img/s (latency rows: ms per image) and, in "
        "brackets, ours' speed / that peer's (> 1: ours is faster). Roofline: img/s at the matmul peak "
        "(2 x GMACs per image, x3 for a training step); share = ours / roofline. glibc keeps freed buffers "
        "(`convnext.fast.keep_freed_memory`, process-wide) for every implementation alike. Training steps: ours "
        "with torch's fused AdamW (as `convnext train`), peers with torch's default AdamW (as timm's train script).",
        "",
    ]
    for model, modes in results.items():
        impls = [i for i in IMPLS if any(i in r["img_per_s"] or i in r["errors"] for r in modes.values())]
        head = ["mode", "batch", *(LABELS[i] for i in impls), "ours / best peer", "roofline", "ours' share"]
        lines += [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mode, r in modes.items():
            ips = r["img_per_s"]
            latency = mode.startswith("latency")
            ours = ips.get("ours")
            cells = [mode, str(r["batch"])]
            for impl in impls:
                if impl in r.get("errors", {}):
                    cells.append("failed")
                elif impl not in ips:
                    cells.append("-")
                else:
                    v = 1e3 / ips[impl] if latency else ips[impl]
                    ratio = f" ({ours / ips[impl]:.2f}x)" if ours and impl != "ours" else ""
                    cells.append(f"{v:.1f}{' ms' if latency else ''}{ratio}")
            peers = {k: v for k, v in ips.items() if k != "ours"}
            best = max(peers, key=peers.get) if peers else None
            cells.append(f"{ours / peers[best]:.2f}x ({LABELS[best]})" if ours and best else "-")
            cells.append(f"{1e3 / r['roofline']:.2f} ms" if latency else f"{r['roofline']:.1f} img/s")
            cells.append(f"{100 * ours / r['roofline']:.0f}%" if ours else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Outputs agree (max |diff| vs our eager fp32 model, inference, same input)", ""]
    for model, modes in results.items():
        for mode, r in modes.items():
            if r.get("agreement"):
                diffs = ", ".join(f"{LABELS[k]} {v:.2g}" for k, v in r["agreement"].items())
                lines.append(f"- {model} {mode}: {diffs}")
    errors = [(m, mode, i, e) for m, ms in results.items() for mode, r in ms.items() for i, e in r["errors"].items()]
    if errors:
        lines += ["", "## Failures", ""] + [f"- {m} {mode} {LABELS[i]}: {e}" for m, mode, i, e in errors]
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    from convnext.viz import plot_grouped_bars

    groups = {}
    for model, modes in results.items():
        for mode, r in modes.items():
            peers = [v for k, v in r["img_per_s"].items() if k != "ours"]
            if peers:
                best = max(peers)
                groups[f"{model} {mode}"] = {LABELS[k]: v / best for k, v in r["img_per_s"].items()}
    if groups:
        plot_grouped_bars(
            groups,
            path,
            ylabel="speed / best peer",
            title="ConvNeXt: speed relative to the best peer",
            highlight=LABELS["ours"],
        )


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    from convnext.fast import keep_freed_memory
    from convnext.flops import count_gmacs
    from convnext.registry import create_model

    torch.set_num_threads(args.threads)
    # Dynamo's default keeps 8 compiled graphs per code object, then runs eager without a word: this run compiles
    # timm's forward once per model, mode and shape, more than 8 times.
    torch._dynamo.config.recompile_limit = 64
    device = torch.device(args.device)
    if device.type == "cpu":
        # What optimize() does to the process's allocator (glibc keeps freed buffers) holds for every
        # implementation timed here, from the first measurement on, not only for those timed after ours.
        keep_freed_memory()
    cases = QUICK if args.quick else CASES
    peaks = matmul_peaks(device, args.quick)
    log(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            case = cases[key]
            torch.manual_seed(0)
            ours = create_model(case.arch).eval().to(device)
            gmacs = count_gmacs(ours, case.img_size)
            gen = torch.Generator().manual_seed(0)
            results[case.arch] = {}
            for mode in args.modes:
                batch = 1 if mode.startswith("latency") else case.batch
                x = torch.randn(batch, 3, case.img_size, case.img_size, generator=gen).to(device)
                y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
                train = mode.startswith("train")
                dt = mode.split("_")[1]
                flops = 2 * gmacs * (3 if train else 1)  # GFLOP per image
                r = {"batch": batch, "img_per_s": {}, "errors": {}, "agreement": {}}
                r["roofline"] = peaks[dt] / flops  # img/s if every FLOP ran at the matmul peak
                runners = {}
                for impl in args.impls:
                    log(f"{case.arch} {mode}: building {impl}")
                    try:
                        runner = make_runner(impl, case, ours, mode, x, y, Path(tmp))
                        if runner is not None:
                            runner()  # warm-up (compiles)
                            runners[impl] = runner
                    except Exception as e:  # one peer failing must not lose the rest of the table
                        r["errors"][impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        log(f"  {impl} failed: {r['errors'][impl]}")
                if not train and runners:
                    with torch.inference_mode():
                        ref = ours(x).float().cpu().numpy()
                    r["agreement"] = agreement(runners, ref)
                log(f"{case.arch} {mode}: timing {', '.join(runners)}")
                times = time_interleaved(runners, args.rounds, args.round_s, device)
                for impl, ts in times.items():
                    r["img_per_s"][impl] = batch / statistics.median(ts)
                    r.setdefault("iterations", {})[impl] = len(ts)
                results[case.arch][mode] = r
                del runners
                log("  " + ", ".join(f"{k} {v:.1f} img/s" for k, v in r["img_per_s"].items()))
    meta = {
        "machine": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_gflops": peaks,
        "quick": args.quick,
        "command": " ".join(["python", *sys.argv]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return results, meta


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,atto", help=f"comma list of {list(CASES)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)} (ours is always run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (onnxruntime runs on CPU only)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--round-s", type=float, default=1.0, help="seconds each implementation runs per round")
    p.add_argument("--quick", action="store_true", help="toy sizes, 1 round: proves the pipeline, numbers meaningless")
    p.add_argument("--out", default="benchmarks/results", help="folder for the .md, .json and .png")
    p.add_argument("--json", action="store_true", help="stdout: one JSON object {model/mode/impl: img/s}")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.impls = ["ours"] + [i for i in args.impls.split(",") if i and i != "ours"]
    for name, values, allowed in (
        ("models", args.models, CASES),
        ("modes", args.modes, MODES),
        ("impls", args.impls, IMPLS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    if args.device == "cuda":
        args.impls = [i for i in args.impls if i != "onnxruntime"]
    if args.quick:
        args.rounds, args.round_s = 1, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, meta = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compare-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}"
    table = markdown(results, meta)
    flat = {
        f"{m}/{mode}/{impl}": v
        for m, ms in results.items()
        for mode, r in ms.items()
        for impl, v in r["img_per_s"].items()
    }
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps({"img_per_s": flat, "results": results, "meta": meta}, indent=1) + "\n")
    chart(results, Path(f"{stem}.png"))
    log(f"wrote {stem}.md, .json, .png")
    print(json.dumps(flat) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

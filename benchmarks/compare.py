"""Our ConvNeXt against timm, torchvision and onnxruntime: same inputs, same weights, same threads, one process each.

    python benchmarks/compare.py                      # everything (tens of minutes on 2 CPU cores: compiles)
    python benchmarks/compare.py --models atto --modes infer_fp32,latency_fp32
    python benchmarks/compare.py --quick              # a tiny smoke run of the whole pipeline (numbers meaningless)
    python benchmarks/compare.py --json               # stdout: one JSON object {"model/mode/impl": img/s}

Implementations: ours = `convnext.optimize` (what `convnext bench` runs), timm eager and torch.compile'd,
torchvision eager, onnxruntime. Every implementation gets the same weights (converted from ours through
`convnext.weights.from_ours`) and its outputs are checked against our eager fp32 model's before its figure counts.
Modes: inference fp32/bf16 at the model's batch, batch-1 latency fp32/bf16, one training step (fwd + bwd + AdamW)
fp32 and bf16; ours steps torch's fused AdamW (as `convnext train` does), the peers torch's default AdamW (as
timm's and torchvision's training scripts do).

How it times (benchmarks/NOTES.md, issue 41): two runtimes in one process leave each other's thread pools
spinning, and on two cores the one timed second read 50% slower. So each implementation runs in a process of its
own (`--child`; this process only starts them and reads their JSON), and times blocks of calls in a row with a
pause between them (`convnext.bench.time_blocks`); its figure is the median block. `--wait`: how idle threads wait
between calls: `spin` (the default) leaves each runtime its own default (OpenMP's wait policy, onnxruntime's
spinning thread pool), which a process of its own can afford and which is each one's best for batch-1 latency;
`passive` makes every runtime park its threads (OMP_WAIT_POLICY=PASSIVE, onnxruntime without spinning), as a
process sharing its cores with other work would want. On this 2-core AMD host the batch-1 rows move by ~20% between
the two (benchmarks/NOTES.md section 14); throughput rows hardly do.
An A/A control times ours again in another process, last: ours / ours should read 1.00 +- 0.03 (CONTROL_TOLERANCE);
where it does not, a warning says so and the table is marked, as its figures do not hold to that precision.

Each peer runs in its best documented setting and its faster one counts (all are reported): timm channels-last,
eager and compiled, bf16 by autocast and (inference) with bf16 weights; onnxruntime with ORT_ENABLE_ALL, intra-op
threads = --threads, spinning as `--wait` says, on our export (fixed and dynamic batch) and on timm's
(`timm.utils.onnx.onnx_export`).

Writes `<out>/compare-<time>.md` (the table, the machine, the matmul peaks, the control, each peer's settings and
the agreement check), `.json` (everything) and `.png` (speed relative to the best peer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
WAITS = {  # --wait: how each runtime's idle threads wait between calls (the method line of the results)
    "spin": "each runtime's default thread waiting (OpenMP's policy, onnxruntime spinning)",
    "passive": "OMP_WAIT_POLICY=PASSIVE and onnxruntime without spinning",
}
CONTROL = "ours_again"  # ours in a second process: the A/A control
LABELS = {
    "ours": "ours (optimize)",
    CONTROL: "ours again (A/A)",
    "timm_eager": "timm eager CL",
    "timm_compiled": "timm compiled CL",
    "torchvision": "torchvision eager",
    "onnxruntime": "onnxruntime",
}
CONTROL_TOLERANCE = 0.03  # |ours / ours - 1| above this: the run's figures do not hold
CHILD_TIMEOUT_S = 1800  # one implementation's build, compile and timing


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings(impl: str, mode: str, case: ModelCase) -> list[str]:
    """The settings `impl` is timed in for `mode` (its figure is the fastest); [] where it does not apply."""
    kind, dt = mode.split("_")
    if impl == "onnxruntime":
        # our export with a fixed batch (ORT folds each MatMul + bias into a Gemm) and with a dynamic one (MatMul +
        # BiasGelu, as timm's export always is): whichever runs faster is ORT's best on our file
        exports = ["our export", "our export, dynamic batch", "timm export"]
        return exports if kind != "train" and dt == "fp32" else []
    if impl == "torchvision" and case.torchvision is None:
        return []
    if dt == "fp32" or impl in ("ours", CONTROL):
        return [dt]
    # bf16 weights are timm's documented inference setting (benchmark.py --model-dtype); a training step on bf16
    # weights would be other arithmetic than a mixed-precision step, so training compares autocast only
    return ["autocast", "bf16 weights"] if kind != "train" and impl.startswith("timm") else ["autocast"]


# ------------------------------------------------------------------------------------------ in the child process


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
    impl: str,
    setting: str,
    case: ModelCase,
    ours: nn.Module,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    tmp: Path,
    spin: bool = True,
) -> Callable[[], object]:
    """A closure running one iteration of `mode` through `impl` in `setting` (not yet warmed up)."""
    from convnext.bench import iteration
    from convnext.fast import optimize

    kind, dt = mode.split("_")
    dtype = torch.bfloat16 if dt == "bf16" else torch.float32
    train = kind == "train"
    if impl == "onnxruntime":
        name = setting.replace(",", "").replace(" ", "-")
        return _onnx_runner(ours, case, setting, x, tmp / f"{case.key}-b{len(x)}-{name}.onnx", spin)
    if impl in ("ours", CONTROL):
        net = optimize(ours, mode="train" if train else "inference", dtype=dtype, example_input=x)
        return iteration(net, ours, x, y, train, dtype, autocast=False, fused_adamw=True)  # optimize() casts
    model = peer_model(impl, case, ours).to(x.device).train(train)
    if impl.startswith("timm"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if setting == "bf16 weights":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    net = torch.compile(model, dynamic=False) if impl == "timm_compiled" else model
    return iteration(net, model, x, y, train, dtype, autocast=setting == "autocast")


def _onnx_runner(
    ours: nn.Module, case: ModelCase, setting: str, x: torch.Tensor, path: Path, spin: bool
) -> Callable[[], object]:
    import onnxruntime as ort

    if setting.startswith("our export"):
        from convnext.export import export_model

        dynamic = setting.endswith("dynamic batch")
        export_model(ours, "onnx", path, img_size=x.shape[-1], batch_size=len(x), dynamic_batch=dynamic, force=True)
    else:
        from timm.utils.onnx import onnx_export

        onnx_export(peer_model("timm", case, ours).eval(), str(path), example_input=x, check=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:  # park the pool between calls (its default spins)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: session.run(None, feed)[0]


def child(spec: dict) -> dict:
    """One job in this (fresh) process: {"job": "peak"} the matmul peaks, else one implementation in one setting
    timed in blocks, its output on the shared input saved for the agreement check (inference modes)."""
    from convnext.bench import matmul_peak_gflops, time_blocks
    from convnext.fast import keep_freed_memory
    from convnext.registry import create_model

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cpu":
        keep_freed_memory()  # what optimize() does to the allocator holds for every implementation alike
    if spec["job"] == "peak":
        n = 512 if spec["quick"] else None
        return {
            d: matmul_peak_gflops(getattr(torch, t), device, n) for d, t in (("fp32", "float32"), ("bf16", "bfloat16"))
        }
    case = (QUICK if spec["quick"] else CASES)[spec["model"]]
    ours = create_model(case.arch)
    ours.load_state_dict(torch.load(spec["weights"], weights_only=True))
    ours = ours.eval().to(device)
    data = torch.load(spec["inputs"], weights_only=True)
    x, y = data["x"].to(device), data["y"].to(device)
    spin = spec.get("wait", "passive") == "spin"
    run = make_runner(spec["impl"], spec["setting"], case, ours, spec["mode"], x, y, Path(spec["tmp"]), spin)
    out = run()  # the first call compiles; its output is checked against ours (inference)
    if spec.get("output"):
        got = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
        np.save(spec["output"], got)
    seconds = time_blocks(run, spec["blocks"], spec["block_s"], spec["pause_s"], device)
    return {"seconds_per_call": seconds}


# ------------------------------------------------------------------------------------------ in the parent


def run_child(spec: dict, timeout: float = CHILD_TIMEOUT_S, script: Path | None = None) -> dict:
    """`spec` run by `child` in a fresh Python process (`script --child SPEC`: this file, or another benchmark that
    times its own implementations this way); its JSON answer, or RuntimeError with its last error line."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env = {
        **env,
        **({} if spec.get("wait") == "spin" else {"OMP_WAIT_POLICY": "PASSIVE"}),  # idle OpenMP threads sleep
        "OMP_NUM_THREADS": str(spec["threads"]),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, str(script or Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"no answer within {timeout:.0f} s") from e
    if p.returncode != 0:
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[-1][:300] if lines else f"exit status {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(spec: dict, r: dict, impl: str, setting: str, batch: int, reference: np.ndarray | None) -> None:
    """One implementation in one setting timed in its own process; its img/s (or its error) lands in r."""
    log(f"  {LABELS[impl]}, {setting}")
    output = Path(spec["tmp"]) / "output.npy"
    output.unlink(missing_ok=True)
    spec = {**spec, "impl": impl, "setting": setting, "output": str(output) if reference is not None else None}
    try:
        seconds = run_child(spec)["seconds_per_call"]
    except RuntimeError as e:  # one peer failing must not lose the rest of the table
        r["settings"].setdefault(impl, {})[setting] = f"failed: {e}"
        log(f"    failed: {e}")
        return
    img_s = batch / statistics.median(seconds)
    r["settings"].setdefault(impl, {})[setting] = img_s
    r["blocks"].setdefault(impl, {})[setting] = [batch / s for s in seconds]
    if reference is not None:
        r["agreement"].setdefault(impl, {})[setting] = float(np.abs(np.load(output) - reference).max())
    log(f"    {img_s:.1f} img/s (median of {len(seconds)} blocks)")


def summarise(r: dict) -> None:
    """Each implementation's figure: its fastest setting (errors where none ran); the A/A control's ratio."""
    for impl, by_setting in r["settings"].items():
        ran = {s: v for s, v in by_setting.items() if isinstance(v, float)}
        if ran:
            r["img_per_s"][impl] = max(ran.values())
            r["best_setting"][impl] = max(ran, key=ran.get)
        else:
            r["errors"][impl] = "; ".join(f"{s}: {v}" for s, v in by_setting.items())
    ips = r["img_per_s"]
    if "ours" in ips and CONTROL in ips:
        r["control"] = ips["ours"] / ips[CONTROL]


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    from convnext.flops import count_gmacs
    from convnext.registry import create_model

    device = torch.device(args.device)
    cases = QUICK if args.quick else CASES
    timing = {"threads": args.threads, "device": args.device, "quick": args.quick, "blocks": args.blocks,
              "block_s": args.block_s, "pause_s": args.pause_s, "wait": args.wait}  # fmt: skip
    peaks = run_child({**timing, "job": "peak"})
    log(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            case = cases[key]
            torch.manual_seed(0)
            ours = create_model(case.arch).eval()
            weights = Path(tmp) / f"{key}.pt"
            torch.save(ours.state_dict(), weights)
            gmacs = count_gmacs(ours, case.img_size)
            gen = torch.Generator().manual_seed(0)
            results[case.arch] = {}
            for mode in args.modes:
                batch = 1 if mode.startswith("latency") else case.batch
                x = torch.randn(batch, 3, case.img_size, case.img_size, generator=gen)
                y = torch.randint(0, 1000, (batch,), generator=gen)
                inputs = Path(tmp) / "inputs.pt"
                torch.save({"x": x, "y": y}, inputs)
                train, dt = mode.startswith("train"), mode.split("_")[1]
                reference = None
                if not train:
                    with torch.inference_mode():
                        reference = ours(x).float().numpy()
                flops = 2 * gmacs * (3 if train else 1)  # GFLOP per image
                r = {"batch": batch, "img_per_s": {}, "errors": {}, "agreement": {}, "settings": {}, "blocks": {},
                     "best_setting": {}, "roofline": peaks[dt] / flops}  # fmt: skip
                spec = {**timing, "job": "time", "model": key, "mode": mode, "weights": str(weights),
                        "inputs": str(inputs), "tmp": tmp}  # fmt: skip
                log(f"{case.arch} {mode}:")
                for impl in [*args.impls, CONTROL]:  # the control last: drift over the sequence shows in it
                    for setting in settings(impl, mode, case):
                        measure(spec, r, impl, setting, batch, reference)
                summarise(r)
                results[case.arch][mode] = r
                if "control" in r and abs(r["control"] - 1) > CONTROL_TOLERANCE:
                    log(f"WARNING: {case.arch} {mode}: A/A control ours / ours = {r['control']:.3f}, outside 1 +- "
                        f"{CONTROL_TOLERANCE}: the machine is not steady enough for these figures to hold")  # fmt: skip
    meta = {
        "machine": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_gflops": peaks,
        "quick": args.quick,
        "method": f"one process per implementation and setting, {WAITS[args.wait]}, {args.blocks} blocks of "
        f"~{args.block_s} s with {args.pause_s} s pauses, median block; A/A control tolerance {CONTROL_TOLERANCE}",
        "command": " ".join(["python", *sys.argv]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return results, meta


# ------------------------------------------------------------------------------------------ reporting


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# ConvNeXt: ours vs peers ({meta['machine']}, {meta['threads']} threads, torch {meta['torch']})",
        "",
        f"Matmul peak measured in this run: {meta['peak_gflops']['fp32']:.0f} GFLOP/s fp32, "
        f"{meta['peak_gflops']['bf16']:.0f} GFLOP/s bf16. Cells: img/s (latency rows: ms per image) and, in "
        "brackets, ours' speed / that peer's (> 1: ours is faster); each peer's figure is its fastest setting (listed "
        "below). A/A: ours / ours timed in a second process (should read 1.00 +- 0.03; `(!)` where it does not and "
        "the row does not hold). Roofline: img/s at the matmul peak (2 x GMACs per image, x3 for a training step); "
        "share = ours / roofline. Training steps: ours with torch's fused AdamW (as `convnext train`), peers with "
        f"torch's default AdamW (as timm's train script). Method: {meta.get('method', '-')}.",
        "",
    ]
    unsteady = []
    for model, modes in results.items():
        impls = [i for i in IMPLS if any(i in r["img_per_s"] or i in r["errors"] for r in modes.values())]
        head = ["mode", "batch", *(LABELS[i] for i in impls), "A/A", "ours / best peer", "roofline", "ours' share"]
        lines += [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for mode, r in modes.items():
            ips = r["img_per_s"]
            latency = mode.startswith("latency")
            ours = ips.get("ours")
            cells = [mode, str(r["batch"])]
            for impl in impls:
                if impl in r["errors"]:
                    cells.append("failed")
                elif impl not in ips:
                    cells.append("-")
                else:
                    v = 1e3 / ips[impl] if latency else ips[impl]
                    ratio = f" ({ours / ips[impl]:.2f}x)" if ours and impl != "ours" else ""
                    cells.append(f"{v:.1f}{' ms' if latency else ''}{ratio}")
            control = r.get("control")
            bad = control is not None and abs(control - 1) > CONTROL_TOLERANCE
            cells.append("-" if control is None else f"{control:.2f}{' (!)' if bad else ''}")
            if bad:
                unsteady.append(f"{model} {mode} ({control:.2f})")
            peers = {k: v for k, v in ips.items() if k not in ("ours", CONTROL)}
            best = max(peers, key=peers.get) if peers else None
            cells.append(f"{ours / peers[best]:.2f}x ({LABELS[best]})" if ours and best else "-")
            cells.append(f"{1e3 / r['roofline']:.2f} ms" if latency else f"{r['roofline']:.1f} img/s")
            cells.append(f"{100 * ours / r['roofline']:.0f}%" if ours else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if unsteady:
        lines[1:1] = ["", f"**WARNING: the A/A control is outside 1 +- {CONTROL_TOLERANCE} in {', '.join(unsteady)}: "
                      "those rows do not hold (a busy or unsteady machine); rerun on an idle one.**"]  # fmt: skip
    lines += ["## Settings (img/s of each; the fastest is the figure)", ""]
    for model, modes in results.items():
        for mode, r in modes.items():
            for impl, by_setting in r.get("settings", {}).items():
                if len(by_setting) > 1:
                    cells = [f"{s} {v:.1f}" if isinstance(v, float) else f"{s} {v}" for s, v in by_setting.items()]
                    lines.append(f"- {model} {mode} {LABELS[impl]}: {', '.join(cells)}")
    lines += ["", "## Outputs agree (max |diff| vs our eager fp32 model, inference, same input)", ""]
    for model, modes in results.items():
        for mode, r in modes.items():
            diffs = [f"{LABELS[i]} {s} {v:.2g}" for i, by in r["agreement"].items() for s, v in by.items()]
            if diffs:
                lines.append(f"- {model} {mode}: {', '.join(diffs)}")
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
            ips = {k: v for k, v in r["img_per_s"].items() if k != CONTROL}
            peers = [v for k, v in ips.items() if k != "ours"]
            if peers:
                best = max(peers)
                groups[f"{model} {mode}"] = {LABELS[k]: v / best for k, v in ips.items()}
    if groups:
        plot_grouped_bars(
            groups,
            path,
            ylabel="speed / best peer",
            title="ConvNeXt: speed relative to the best peer",
            highlight=LABELS["ours"],
        )


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
    p.add_argument("--blocks", type=int, default=7, help="timed blocks per implementation (the median counts)")
    p.add_argument("--block-s", type=float, default=1.0, help="seconds of calls in a row per block")
    p.add_argument("--pause-s", type=float, default=0.5, help="sleep before each block (threads park)")
    p.add_argument("--wait", choices=list(WAITS), default="spin", help="idle threads between calls: each "
                   "runtime's default (spin), or parked (passive)")  # fmt: skip
    p.add_argument(
        "--quick", action="store_true", help="toy sizes, 2 short blocks: proves the pipeline, numbers meaningless"
    )
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
            p.error(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    if args.threads < 1 or args.blocks < 1 or args.block_s < 0 or args.pause_s < 0:
        p.error("--threads and --blocks must be >= 1, --block-s and --pause-s >= 0")
    if args.device == "cuda":
        args.impls = [i for i in args.impls if i != "onnxruntime"]
    if args.quick:
        args.blocks, args.block_s, args.pause_s = 2, 0.0, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
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

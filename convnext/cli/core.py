"""Core commands: `list`, `info`."""

from __future__ import annotations

import argparse
import json

from convnext.cli.args import positive_int


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models (or published weights with --pretrained)")
    p.add_argument("pattern", nargs="?", default=None, help="shell pattern, e.g. 'convnextv2_*' or 'roadmap_*'")
    p.add_argument("--pretrained", action="store_true", help="list published weights (arch.tag) instead")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("system", help="what this machine gives the fast path: torch, oneDNN, ISA, C kernels")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_system)

    p = sub.add_parser("info", help="parameters, GMACs and activation memory of a model")
    p.add_argument("model", help="registered name, e.g. convnext_tiny")
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def cmd_list(args: argparse.Namespace) -> int:
    from convnext.registry import list_models

    for name in list_models(args.pattern, pretrained=args.pretrained):
        print(name)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from convnext.flops import measure
    from convnext.registry import create_model, split_name

    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    cost = measure(create_model(split_name(args.model)[0], **overrides), args.img_size)
    if args.json:
        print(json.dumps({"model": args.model, **cost.as_dict()}))
    else:
        print(f"{args.model} at {cost.img_size}x{cost.img_size}")
        print(f"  params            {cost.params:,}")
        print(f"  GMACs             {cost.gmacs:.3f}")
        print(f"  activations (MB)  {cost.activation_mb:.1f} saved for backward, {cost.forward_mb:.1f} forward outputs")
    return 0


def system_info() -> dict:
    """torch and its CPU backends, the CPU's vector extensions the kernels use, threads, and the C kernels' state."""
    import platform
    from pathlib import Path

    import torch

    from convnext import fast
    from convnext.fast import kernels

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    isa = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": model or platform.processor() or platform.machine(),
        "isa": {name: name in flags for name in isa} if flags else "unknown (no /proc/cpuinfo)",
        "threads": torch.get_num_threads(),
        "onednn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "fast_path": fast.usable(),
        "c_kernels": kernels.status(),
        "tiled_mlp": kernels.tiled_mlp_available(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def cmd_system(args: argparse.Namespace) -> int:
    info = system_info()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            shown = ", ".join(k for k, v in value.items() if v) or "none" if isinstance(value, dict) else value
            print(f"{key:10s} {shown}")
    return 0

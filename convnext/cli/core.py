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

"""Weight commands: `convert` (between state-dict layouts) and `download` (into the cache)."""

from __future__ import annotations

import argparse
from pathlib import Path

LAYOUT_CHOICES = ("ours", "official", "timm", "torchvision", "hf")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between layouts (any layout in, safetensors or .pth out)")
    p.add_argument("src", help="weight file (.pth/.pt/.bin/.safetensors, or a Hugging Face model folder)")
    p.add_argument("dst", help="output file: .safetensors, or .pth/.pt for torch.save")
    p.add_argument("--to", choices=LAYOUT_CHOICES, default="ours", help="layout to write (default: ours)")
    p.add_argument("--model", help="registered model the weights must load into (checked before writing)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights when the file has both")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="download published weights into the cache, checking their sha256")
    p.add_argument("name", help="arch.tag, or arch for its default weights (see `convnext list --pretrained`)")
    p.add_argument("--cache-dir", default=None, help="default: $CONVNEXT_HOME/weights or ~/.cache/convnext/weights")
    p.set_defaults(func=cmd_download)


def cmd_convert(args: argparse.Namespace) -> int:
    from convnext.registry import create_model
    from convnext.weights import detect_layout, from_ours, load_checkpoint, read_state_dict, save_weights, to_ours

    dst = Path(args.dst)
    if dst.exists() and not args.force:
        raise ValueError(f"{dst}: already exists; pass --force to replace it")
    sd = read_state_dict(args.src, ema=args.ema)
    layout = detect_layout(sd)
    ours = to_ours(sd, layout)
    if args.model:  # build the model the weights describe (classes, input channels) and load them strictly
        head, stem = ours.get("head.weight"), ours.get("stem.0.weight")
        overrides = {"num_classes": 0 if head is None else head.shape[0]}
        if stem is not None:
            overrides["in_chans"] = stem.shape[1]
        load_checkpoint(create_model(args.model, **overrides), ours, strict=True)
    out = from_ours(ours, args.to)
    meta = {"format": "pt", "layout": args.to, "source": Path(args.src).name, "source_layout": layout}
    save_weights(out, dst, metadata=meta, force=args.force, wrap_key="model" if args.to == "official" else None)
    print(f"{args.src} ({layout} layout, {len(sd)} tensors) -> {dst} ({args.to} layout, {len(out)} tensors)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import warnings

    from convnext.registry import split_name
    from convnext.weights import fetch, resolve_spec

    spec = resolve_spec(*split_name(args.name))
    if spec.non_commercial:
        warnings.warn(f"{spec.name}: the weights are licensed {spec.license}: non-commercial use only", stacklevel=1)
    print(fetch(spec, args.cache_dir))
    return 0

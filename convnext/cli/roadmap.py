"""Roadmap commands: `roadmap` (train the ResNet-50 -> ConvNeXt-T ladder) and `erf` (effective receptive fields)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from convnext.cli.args import positive_float, positive_int

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("roadmap", help="train the roadmap steps (ResNet-50 -> ConvNeXt-T) on one data set and budget")
    p.add_argument("--data", required=True, help="'cifar10' or an image folder with train/ and val/ (or test/)")
    p.add_argument("--budget-min", type=positive_float, required=True, help="wall-clock training minutes per step")
    p.add_argument("--steps", default="0-12", help="steps to run, e.g. '0,2,5-12' (default all)")
    p.add_argument("--output", required=True, help="folder for results.json, the table and the figure")
    p.add_argument("--data-dir", default=None, help="where CIFAR-10 is, or is unpacked to")
    p.add_argument(
        "--img-size",
        type=positive_int,
        default=None,
        help="training size (default: 32 for CIFAR, else the images' own, <= 224)",
    )
    p.add_argument("--patch-size", type=int, default=None, help="stem stride (default 2 for 32px images, else 4)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=float, default=None, help="peak lr of the modern recipe (AdamW), default 2e-3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_roadmap)

    p = sub.add_parser("erf", help="effective receptive field heatmap(s) and area shares of one or more models")
    p.add_argument("models", nargs="+", help="registered names or run folders; several go side by side in one figure")
    p.add_argument("--images", default=None, help="folder of images to average over (default: random images)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--checkpoint", action="append", default=None, help="weights or run per model (repeat, in order)")
    p.add_argument("--img-size", type=positive_int, default=None, help="default: the run's / weights' size, else 224")
    p.add_argument("--patch-size", type=int, default=None, help="untrained models: stem stride (1 or 2 for 32px)")
    p.add_argument("--num-classes", type=int, default=None, help="untrained models: head size")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--output", default="erf.png", help="PNG to write")
    p.add_argument("--json", action="store_true", help="print the area shares as JSON")
    p.set_defaults(func=cmd_erf)


def parse_steps(text: str) -> list[int]:
    """'0,2,5-12' -> [0, 2, 5, 6, ..., 12]; raises ValueError on anything outside 0..12."""
    steps: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            rng = range(int(lo), int(hi or lo) + 1)
        except ValueError:
            raise ValueError(f"--steps: cannot read {part!r} (use e.g. '0,2,5-12')") from None
        steps += [s for s in rng if s not in steps]
    if not steps or any(s < 0 or s > 12 for s in steps):
        raise ValueError(f"--steps: steps are 0..12, got {text!r}")
    return sorted(steps)


def cmd_roadmap(args: argparse.Namespace) -> int:
    from convnext.train.roadmap import LadderConfig, run_ladder

    cfg = LadderConfig(
        data=args.data,
        budget_min=args.budget_min,
        steps=tuple(parse_steps(args.steps)),
        output=args.output,
        data_dir=args.data_dir,
        img_size=args.img_size,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        device=args.device,
        seed=args.seed,
    )
    rows = run_ladder(cfg)
    print(Path(cfg.output, "roadmap.md").read_text() if rows else "no steps run")
    return 0


def cmd_erf(args: argparse.Namespace) -> int:
    import torch

    from convnext.erf import area_shares, erf_map, load_images, plot_erfs, random_images
    from convnext.registry import create_model, split_name
    from convnext.resolve import resolve

    checkpoints = args.checkpoint or []
    if len(checkpoints) > len(args.models):
        raise ValueError(f"--checkpoint given {len(checkpoints)} times for {len(args.models)} model(s)")
    overrides = {k: v for k, v in (("num_classes", args.num_classes), ("patch_size", args.patch_size)) if v is not None}
    maps, report = {}, []
    for i, name in enumerate(args.models):
        ckpt = checkpoints[i] if i < len(checkpoints) else None
        local = Path(name).exists()  # a run folder or a run's best.pt / last.pt
        tagged = split_name(name)[1] is not None and not local  # convnext_tiny.fb_in1k
        if ckpt or tagged or local:  # trained weights: the model is built the way their run or file says
            loaded = resolve(ckpt, model=name) if ckpt else resolve(name)
            model, pre = loaded.model, loaded.preprocess
            size, mean, std = args.img_size or pre.img_size, pre.mean, pre.std
        else:
            model = create_model(name, **overrides)
            size, mean, std = args.img_size or 224, None, None
        if args.images:
            norm = {"mean": mean, "std": std} if mean is not None else {}
            images = load_images(args.images, size, args.num_images, **norm)
        else:
            images = random_images(args.num_images, size)
        erf = erf_map(model, torch.split(images, args.batch_size))
        label = name if not local else Path(name).name if Path(name).is_dir() else "/".join(Path(name).parts[-2:])
        maps[label] = erf
        shares = {f"{int(t * 100)}%": round(s, 5) for t, s in area_shares(erf).items()}
        report.append({"model": label, "checkpoint": ckpt, "img_size": size, "area_shares": shares})
    out = plot_erfs(maps, args.output)
    if args.json:
        print(json.dumps(report))
    else:
        source = f"{args.num_images} images from {args.images}" if args.images else f"{args.num_images} random images"
        print(f"effective receptive field, averaged over {source} -> {out}")
        for r in report:
            shares = "  ".join(f"{t}: {s:.2%}" for t, s in r["area_shares"].items())
            print(f"  {r['model']:36s} {r['img_size']}px  area holding {shares}")
    return 0

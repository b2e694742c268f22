"""`convnext detect train|eval|predict` and `convnext segment train|eval|predict`: ConvNeXt as a dense backbone."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from convnext.cli.args import add_config_flags, build_config, positive_float, positive_int, print_config, run_config


def add_commands(sub: argparse._SubParsersAction) -> None:
    for task, preset, what in (
        ("detect", "pennfudan", "object detection and instance segmentation (torchvision Mask/Faster R-CNN + FPN)"),
        ("segment", "camvid", "semantic segmentation (UperNet)"),
    ):
        p = sub.add_parser(task, help=what, description=f"{what} on a ConvNeXt backbone")
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        _add_train(actions, task, preset)
        _add_eval(actions, task)
        _add_predict(actions, task)


def _add_train(actions: argparse._SubParsersAction, task: str, preset: str) -> None:
    from convnext.dense.config import DETECT_PRESETS, SEGMENT_PRESETS

    presets = ", ".join(DETECT_PRESETS if task == "detect" else SEGMENT_PRESETS)
    p = actions.add_parser(
        "train",
        help="train (or resume) a run; any config field as --section.field VALUE",
        description=f"Train a {task} run. Presets: {presets}. Any config field can be set as --section.field VALUE "
        "(e.g. --optim.lr 3e-4 --backbone.frozen_stages 1 --data.train_sizes 288,320,352); --print-config shows them. "
        "On N GPUs: torchrun --nproc_per_node N -m convnext ... (or srun under SLURM; --batch-size is the global "
        "batch); several machines and SLURM: docs/distributed.md.",
    )
    p.add_argument("--preset", default=None, help=f"starting config (default: {preset})")
    p.set_defaults(default_preset=preset)
    p.add_argument("--model", default=None, help="backbone: a registered name (convnext list) or resnet50 (the peer)")
    p.add_argument("--data", default=None, help="dataset root (pennfudan: PennFudanPed/; camvid: CamVid/)")
    p.add_argument("--output", default=None, help="run folder to create")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (schedule fitted)")
    p.add_argument("--budget-min", type=positive_float, default=None, help="wall-clock training budget in minutes")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--checkpoint", default=None, help="backbone weights: a file in any layout convnext reads")
    p.add_argument("--pretrained-run", default=None, help="backbone weights: a train or pretrain run folder")
    p.add_argument("--pretrained", action="store_true", help="backbone weights: the published ones of --model "
                   "(a tag like convnext_atto.d2_in1k implies it)")  # fmt: skip
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    add_config_flags(p)
    p.set_defaults(func=cmd_train, task=task)


def _add_eval(actions: argparse._SubParsersAction, task: str) -> None:
    p = actions.add_parser("eval", help="score a run on its validation data (or another split / folder)")
    p.add_argument("run_dir", help=f"a run folder written by `convnext {task} train`")
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--data", default=None, help="another dataset root in the run's format")
    if task == "segment":
        p.add_argument("--split", default=None, help="camvid split to score (default: the run's val split)")
        p.add_argument("--mode", default=None, choices=["whole", "slide"], help="inference mode")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--workers", type=int, default=None, help="data-loading workers (default: sized to the machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval, task=task)


def _add_predict(actions: argparse._SubParsersAction, task: str) -> None:
    p = actions.add_parser("predict", help="write overlay PNGs for images")
    p.add_argument("run_dir", help=f"a run folder written by `convnext {task} train`")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--output", required=True, help="folder for the overlay PNGs")
    p.add_argument("--which", default="best", choices=["best", "last"])
    if task == "detect":
        p.add_argument("--score-thresh", type=float, default=None, help="draw detections above this score")
    else:
        p.add_argument("--mode", default=None, choices=["whole", "slide"], help="inference mode")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.set_defaults(func=cmd_predict, task=task)


def cmd_train(args: argparse.Namespace) -> int:
    from convnext.dense.config import DetectConfig, SegmentConfig, get_preset

    cls = DetectConfig if args.task == "detect" else SegmentConfig
    if args.resume and (args.model or args.data or args.checkpoint or args.pretrained_run or args.pretrained):
        raise ValueError("--resume continues a run with its own config, model, data and weights; drop those flags")

    def start(given: dict[str, Any]) -> DetectConfig | SegmentConfig:
        if args.resume:
            return run_config(args.resume, cls)
        preset = args.preset or given.get("preset") or args.default_preset
        return get_preset(args.task, preset, args.model or given.get("backbone.model"))

    flags = {
        "data.root": args.data,
        "run.output": args.output,
        "run.epochs": args.epochs,
        "run.max_steps": args.max_steps,
        "run.budget_min": args.budget_min,
        "run.batch_size": args.batch_size,
        "run.seed": args.seed,
        "run.device": args.device,
        "run.threads": args.threads,
        "run.resume": args.resume,
        "run.overwrite": args.overwrite or None,
        "backbone.checkpoint": args.checkpoint,
        "backbone.pretrained_run": args.pretrained_run,
        "backbone.pretrained": args.pretrained or None,
    }
    cfg = build_config(args, cls, start, flags)
    if args.print_config:
        print_config(cfg)
        return 0
    from convnext.dense.train import train_detection, train_segmentation

    result = (train_detection if args.task == "detect" else train_segmentation)(cfg)
    _print(result, args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from convnext.dense.train import (
        detection_datasets,
        evaluate_detection,
        evaluate_segmentation,
        load_dense_run,
        segmentation_datasets,
    )
    from convnext.engine.distributed import resolve_device
    from convnext.engine.loop import cuda_switches, loader_workers

    model, cfg = load_dense_run(args.run_dir, args.which)
    device = resolve_device(args.device)
    model.to(device)
    cuda_switches(device)
    workers = loader_workers(args.workers)
    if args.data:
        cfg.data.root = args.data
    if args.task == "detect":
        if not hasattr(cfg, "masks"):
            raise ValueError(f"{args.run_dir} is a segmentation run; use `convnext segment eval`")
        _, val, _ = detection_datasets(cfg)
        result = evaluate_detection(model, val, device, cfg.masks, workers)
    else:
        if hasattr(cfg, "masks"):
            raise ValueError(f"{args.run_dir} is a detection run; use `convnext detect eval`")
        if args.mode:
            cfg.data.mode = args.mode
        _, val = segmentation_datasets(cfg, val_split=args.split)
        result = evaluate_segmentation(model, val, cfg, device, workers)
    result["n"] = len(val)
    _print(result, args.json)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from convnext.dense.predict import image_files, predict_detection, predict_segmentation
    from convnext.dense.train import load_dense_run
    from convnext.engine.distributed import resolve_device

    model, cfg = load_dense_run(args.run_dir, args.which)
    images = image_files(args.images)
    device = resolve_device(args.device)
    skipped: list[str] = []  # unreadable images: named, left out, the rest still predicted
    if args.task == "detect":
        if not hasattr(cfg, "masks"):
            raise ValueError(f"{args.run_dir} is a segmentation run; use `convnext segment predict`")
        written = predict_detection(model, cfg, images, Path(args.output), args.score_thresh, device, skipped)
    else:
        if hasattr(cfg, "masks"):
            raise ValueError(f"{args.run_dir} is a detection run; use `convnext detect predict`")
        if args.mode:
            cfg.data.mode = args.mode
        written = predict_segmentation(model, cfg, images, Path(args.output), device, skipped)
    for error in skipped:
        print(f"skipped: {error}", file=sys.stderr)
    print(f"wrote {len(written)} overlay(s) to {args.output}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0 if written or not skipped else 1


def _print(result: dict, as_json: bool) -> None:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    if as_json:
        out = {k: ({n: clean(x) for n, x in v.items()} if isinstance(v, dict) else clean(v)) for k, v in result.items()}
        print(json.dumps(out))
        return
    for k, v in result.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for n, x in v.items():
                print(f"  {n:<14} {x:.4f}")
        elif isinstance(v, float):
            print(f"{k:<16} {v:.4f}")
        else:
            print(f"{k:<16} {v}")

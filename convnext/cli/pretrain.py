"""`convnext pretrain`: parse flags into a PretrainConfig and call `convnext.pretrain.pretrain`."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from convnext.cli.args import add_config_flags, build_config, positive_float, positive_int, print_config, run_config


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training of a ConvNeXt encoder (FCMAE, ConvNeXt V2's masked autoencoder)",
        description="FCMAE pre-training: random 60% of the patches (as large as the encoder's total stride) are "
        "removed, the encoder sees the rest as a sparse network, a one-block decoder predicts the removed pixels. "
        "Presets: small (the default: batch 128, input size and stem chosen from the images) and in1k (the paper's "
        "224px ImageNet recipe). Any config field can be set as --section.field VALUE (e.g. --fcmae.decoder_dim 256, "
        "--model.patch_size 2). Fine-tune the result with `convnext train --data DIR --pretrained-run RUN` (the same "
        "as --model RUN: the automatic fine-tune with its FCMAE settings). Also runs under "
        "`torchrun --nproc_per_node N -m convnext pretrain ...`.",
    )
    p.add_argument("--model", default=None, help="a ConvNeXt (V2 as in the paper; default convnextv2_atto)")
    p.add_argument("--data", default=None, help="image folder (its train/ split; labels unused), cifar10, ...")
    p.add_argument("--output", default=None, help="run folder to create (default runs/pretrain)")
    p.add_argument("--preset", default=None, choices=["small", "in1k"], help="starting config (default: small)")
    p.add_argument("--mask-ratio", type=float, default=None, help="share of the patches removed (default 0.6)")
    p.add_argument("--epochs", type=positive_int, default=None, help="an upper bound with --budget-min")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch per optimizer step")
    p.add_argument("--img-size", type=positive_int, default=None, help="default: from the images (64..224)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default=None, help="where cifar10/cifar100 are (or get downloaded)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images")
    p.add_argument("--budget-min", type=positive_float, default=None, help="wall-clock training budget in minutes")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    add_config_flags(p)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from convnext.engine.distributed import resolve_device
    from convnext.pretrain import PRESETS, PretrainConfig, pretrain
    from convnext.train.auto import gpu_amp

    if args.resume and (args.model or args.data):
        raise ValueError("--resume continues a run with its own model and data; drop --model/--data")

    def start(given: dict[str, Any]) -> PretrainConfig:
        if args.resume:
            return run_config(args.resume, PretrainConfig)
        preset, model = args.preset or given.get("preset") or "small", args.model or given.get("model.name")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        if preset == "small":
            batch_size, epochs = args.batch_size or given.get("batch_size"), args.epochs or given.get("epochs")
            cfg = PRESETS["small"](model or "convnextv2_atto", batch_size=batch_size or 128, epochs=epochs or 100)
        else:
            cfg = PRESETS["in1k"](model or "convnextv2_atto")
        if "amp" not in given:  # on a GPU: mixed precision unless asked otherwise
            cfg.amp = gpu_amp(resolve_device(args.device or given.get("device") or cfg.device))
            if cfg.amp != "none":
                cfg.recipe.append(f"on the GPU: mixed precision {cfg.amp} (`--amp none` for float32)")
        return cfg

    flags = {
        "data.name": args.data,
        "output": args.output,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "data.img_size": args.img_size,
        "fcmae.mask_ratio": args.mask_ratio,
        "seed": args.seed,
        "device": args.device,
        "data.data_dir": args.data_dir,
        "budget_min": args.budget_min,
        "data.skip_bad_images": args.skip_bad_images or None,
        "overwrite": args.overwrite or None,
        "resume": args.resume,
    }
    cfg = build_config(args, PretrainConfig, start, flags)
    if args.print_config:
        print_config(cfg)
        return 0
    result = pretrain(cfg)
    logging.getLogger("convnext.pretrain").info(
        "done: val loss %.4f on masked patches; run folder %s (fine-tune: convnext train --pretrained-run %s)",
        result["loss"], result["run_dir"], result["run_dir"],
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("loss", "train_loss", "img_per_s", "grid", "run_dir")}))
    return 0

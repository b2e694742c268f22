"""`convnext pretrain`: parse flags into a PretrainConfig and call `convnext.pretrain.pretrain`."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from convnext.cli.args import add_config_flags, add_run_args, build_config, print_config, run_config, run_flags


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
    add_run_args(p, epochs_help="an upper bound with --budget-min", img_size_help="default: from the images (64..224)")
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

    flags = run_flags(args) | {"fcmae.mask_ratio": args.mask_ratio}
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

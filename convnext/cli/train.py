"""`convnext train`: parse flags into a TrainConfig and call `convnext.train.fit`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from convnext.cli.args import add_config_flags, add_run_args, build_config, print_config, run_config, run_flags
from convnext.config import apply_overrides, field_paths


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a model (any config field as --section.field VALUE, e.g. --optim.lr 1e-3)",
        description="Train or fine-tune. Presets: auto (the default for any data but digits: a from-scratch recipe "
        "chosen from the data and the budget), demo (the default for digits), cifar10, finetune, in22k_ft_in1k, "
        "in1k_<variant>. "
        "Any config field can be set as --section.field VALUE (e.g. --optim.lr 1e-3 --data.mixup 0). "
        "Also runs under `torchrun --nproc_per_node N -m convnext train ...`.",
    )
    p.add_argument(
        "--model", default=None, metavar="NAME|SOURCE", help="a registered name (random weights; default: the "
        "preset's) or the weights to start from: arch.tag (published), hf-hub:org/name, a pretrained folder, a "
        "`convnext train` or `convnext pretrain` run folder. With weights and no --preset the automatic recipe "
        "fine-tunes",
    )  # fmt: skip
    p.add_argument("--pretrained", action="store_true", help="start from the published weights of --model (without "
                   "--model: the largest published weights the budget trains for enough passes)")  # fmt: skip
    p.add_argument("--data", default=None, help="image folder, cifar10, cifar100, or digits (embedded)")
    p.add_argument("--output", default=None, help="run folder to create (default: the preset's, runs/<preset>)")
    p.add_argument(
        "--preset", default=None, help="starting config (default: auto; demo for --data digits or no --data)"
    )
    add_run_args(p)
    p.add_argument(
        "--pretrained-run", default=None, metavar="RUN_DIR", help="start from the encoder of a `convnext pretrain` "
        "run: the same as --model RUN_DIR (its model, stem, weights and normalisation; with no --preset the automatic "
        "fine-tune, which takes the FCMAE settings)",
    )  # fmt: skip
    p.add_argument("--select", default=None, metavar="METRIC", help="the val metric that picks best.pt: top1 "
                   "(default), macro_f1, balanced_accuracy or loss")  # fmt: skip
    p.add_argument("--early-stop", type=int, default=None, metavar="N", help="stop after N evaluated epochs "
                   "without a better --select metric (budgeted runs keep their schedule)")  # fmt: skip
    p.add_argument(
        "--shard",
        action="store_true",
        help="FSDP: shard parameters, gradients and optimizer state over the processes (for XL/XXL/V2-huge under "
        "torchrun)",
    )
    p.add_argument("--log", default=None, metavar="mlflow|wandb", help="also log to MLflow and/or Weights & "
                   "Biases (comma-separated), offline into the run folder (pip install 'convnext[track]')")  # fmt: skip
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from convnext.engine.report import TRACKERS
    from convnext.extras import require
    from convnext.train import TrainConfig, auto_recipe, fit, get_preset
    from convnext.train.finetune import finetune_recipe
    from convnext.train.fit import selection_problems
    from convnext.train.start import is_source, starting_weights

    trackers = [t.strip() for t in args.log.split(",") if t.strip()] if args.log else None
    bad = selection_problems(args.select or "top1", args.early_stop or 0, trackers or [])
    if bad:  # one line before the data is read
        raise ValueError("; ".join(bad))
    for t in dict.fromkeys(trackers or []):
        require(TRACKERS[t], what=f"--log {t}")

    source = args.model  # the model or the weights to start from
    if args.pretrained_run:  # the same as --model RUN: checked now, one line before any work
        from convnext.pretrain.runs import read_run
        from convnext.registry import split_name

        if args.resume:
            raise ValueError("--pretrained-run starts a run, --resume continues one: give one of them")
        arch = split_name(read_run(args.pretrained_run)[0].model.name)[0]
        if args.model and args.model != args.pretrained_run and split_name(args.model)[0] != arch:
            raise ValueError(f"--pretrained-run {args.pretrained_run} holds a {arch}; drop --model {args.model}")
        source = args.pretrained_run
    if args.resume and (args.model or args.data):
        raise ValueError("--resume continues a run with its own model and data; drop --model/--data")

    def start(given: dict[str, Any]) -> TrainConfig:
        if args.resume:
            return run_config(args.resume, TrainConfig)
        model = source or given.get("model.name")
        data = args.data or given.get("data.name")
        preset = args.preset or given.get("preset") or ("demo" if data in (None, "digits") else "auto")
        weights, checkpoint = None, given.get("model.checkpoint")
        # the weights are read now (one error before any work) where the recipe needs them: the automatic fine-tune,
        # or a preset given a run, folder, Hub repo or file (a preset and a tag: the preset loads it when it runs)
        named_weights = is_source(model) and not (preset != "auto" and not Path(model).exists() and ":" not in model)
        if (model or checkpoint) and (named_weights or checkpoint or args.pretrained and preset == "auto"):
            weights = starting_weights(model, args.pretrained, checkpoint)  # one error now if they cannot be read
            model = weights.arch if weights is not None else model
        if preset == "auto" and set(field_paths(TrainConfig)) <= set(given):
            cfg = TrainConfig()  # every field given (a run's config.json): no recipe to choose from the data
        elif preset != "auto":
            cfg = get_preset(preset, model)
            if weights is not None:  # the weights' normalisation where the preset leaves it to them
                own = {k: v for k, v in weights.overrides.items() if not k.startswith("data.") or cfg.data.mean is None}
                apply_overrides(cfg, own)
            elif args.pretrained:
                cfg.model.pretrained = True
        elif data is None:
            raise ValueError("--preset auto needs --data (an image folder, cifar10 or cifar100)")
        elif weights is not None or args.pretrained:
            cfg = finetune_recipe(
                data, weights, img_size=args.img_size or given.get("data.img_size"),
                budget_min=args.budget_min or given.get("budget_min"), epochs=args.epochs or given.get("epochs"),
                batch_size=args.batch_size or given.get("batch_size"),
                data_dir=args.data_dir or given.get("data.data_dir"), device=args.device or given.get("device"),
            )  # fmt: skip
        else:
            shape = any(k.split(".")[:2] == ["model", "kwargs"] for k in given)  # a shape given: the recipe keeps it
            cfg = auto_recipe(
                data,
                img_size=args.img_size or given.get("data.img_size"),
                budget_min=args.budget_min or given.get("budget_min"),
                epochs=args.epochs or given.get("epochs"),
                model=model or ("convnext_atto" if shape else None),
                patch_size=given.get("model.patch_size"),
                batch_size=args.batch_size or given.get("batch_size"),
                data_dir=args.data_dir or given.get("data.data_dir"),
                threads=given.get("threads"),
                device=args.device or given.get("device"),
                balance=given.get("data.balance"),
            )
        return cfg

    flags = run_flags(args) | {
        "select": args.select,
        "early_stop": args.early_stop,
        "trackers": trackers,
        "shard": args.shard or None,
    }
    cfg = build_config(args, TrainConfig, start, flags)
    if args.print_config:
        print_config(cfg)
        return 0
    result = fit(cfg)
    logging.getLogger("convnext.train").info(
        "done: val top-1 %.2f%% (top-5 %.2f%%, macro-F1 %.2f%%) on %s held-out images; run folder %s",
        result["top1"], result["top5"], result["macro_f1"], result["n"], result["run_dir"],
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("top1", "top5", "loss", "run_dir") if k in result}))
    return 0

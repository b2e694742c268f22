"""`convnext train`: parse flags into a TrainConfig and call `convnext.train.fit`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from convnext.cli.args import positive_float, positive_int


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
    p.add_argument("--model", default=None, help="registered model name (default: the preset's)")
    p.add_argument("--data", default=None, help="image folder, cifar10, cifar100, or digits (embedded)")
    p.add_argument("--output", default=None, help="run folder to create (default: the preset's, runs/<preset>)")
    p.add_argument(
        "--preset", default=None, help="starting config (default: auto; demo for --data digits or no --data)"
    )
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch per optimizer step")
    p.add_argument("--img-size", type=positive_int, default=None)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument(
        "--pretrained-run", default=None, metavar="RUN_DIR", help="start from the encoder of a `convnext pretrain` "
        "run (its model, stem, weights and normalisation)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default=None, help="where cifar10/cifar100 are (or get downloaded)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images")
    p.add_argument("--budget-min", type=positive_float, default=None, help="wall-clock training budget in minutes")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument(
        "--config", default=None, metavar="FILE", help="config fields from a .json/.yaml file (a run's config.json "
        "works); flags given here override it",
    )  # fmt: skip
    p.set_defaults(func=cmd_train, accepts_overrides=True)


def cmd_train(args: argparse.Namespace) -> int:
    from convnext.train import apply_overrides, auto_recipe, fit, from_dict, get_preset
    from convnext.train.config import read_config_file

    from_file = read_config_file(args.config) if args.config else {}
    if args.resume and from_file:
        raise ValueError("--resume continues a run with its own config.json; drop --config")
    # the recipe's inputs: a flag, else the file's value
    args.preset = args.preset or from_file.pop("preset", None)
    for flag, key in (("data", "data.name"), ("img_size", "data.img_size"), ("budget_min", "budget_min"),
                      ("epochs", "epochs"), ("model", "model.name"), ("batch_size", "batch_size"),
                      ("data_dir", "data.data_dir")):  # fmt: skip
        if getattr(args, flag) is None and from_file.get(key) is not None:
            setattr(args, flag, from_file[key])
    pre: dict[str, Any] = {}  # what a pre-training run fixes: the architecture, its weights, its normalisation
    if args.pretrained_run:
        from convnext.pretrain.runs import finetune_overrides

        if args.resume:
            raise ValueError("--pretrained-run starts a run, --resume continues one: give one of them")
        pre = finetune_overrides(args.pretrained_run)
        if args.model and args.model.split(".")[0] != pre["model.name"]:
            raise ValueError(f"--pretrained-run {args.pretrained_run} holds a {pre['model.name']}; drop --model")
        args.model = pre["model.name"]
    if args.resume:
        cfg_path = Path(args.resume) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {cfg_path} does not exist")
        cfg = from_dict(json.loads(cfg_path.read_text()))
        cfg.resume = args.resume
    else:
        preset = args.preset or ("demo" if args.data in (None, "digits") else "auto")
        if preset == "auto":
            if args.data is None:
                raise ValueError("--preset auto needs --data (an image folder, cifar10 or cifar100)")
            cfg = auto_recipe(
                args.data,
                img_size=args.img_size,
                budget_min=args.budget_min,
                epochs=args.epochs,
                model=args.model or _given(args.overrides, "model.name", str) or _shape_given(args.overrides),
                patch_size=_given(args.overrides, "model.patch_size", int) or pre.get("model.patch_size"),
                batch_size=args.batch_size,
                data_dir=args.data_dir,
                threads=_given(args.overrides, "threads", int),
                device=args.device or _given(args.overrides, "device", str),
            )
        else:
            cfg = get_preset(preset, args.model)
    flags = {
        "data.name": args.data,
        "output": args.output,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "data.img_size": args.img_size,
        "seed": args.seed,
        "device": args.device,
        "data.data_dir": args.data_dir,
        "budget_min": args.budget_min,
    }
    if args.resume and (args.model or args.data):
        raise ValueError("--resume continues a run with its own model and data; drop --model/--data")
    if pre:
        apply_overrides(cfg, pre)
        cfg.recipe.append(
            f"model: the encoder of the pre-training run {args.pretrained_run} ({pre['model.name']}, stem "
            f"{pre['model.patch_size']}x{pre['model.patch_size']}, its mean/std), not whitened: a fresh head on top; "
            f"layer-wise lr decay {pre['optim.layer_decay']} from the head down"
        )
    try:
        apply_overrides(cfg, from_file)
    except ValueError as e:
        raise ValueError(f"--config {args.config}: {e}") from None
    apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    if args.skip_bad_images:
        cfg.data.skip_bad_images = True
    if args.overwrite:
        cfg.overwrite = True
    apply_overrides(cfg, args.overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = fit(cfg)
    logging.getLogger("convnext.train").info(
        "done: val top-1 %.2f%% (top-5 %.2f%%) on %s held-out images; run folder %s",
        result["top1"], result["top5"], result["n"], result["run_dir"],
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("top1", "top5", "loss", "run_dir") if k in result}))
    return 0


def _shape_given(overrides: list[str]) -> str | None:
    """convnext_atto when a flag sets the model's shape (`--model.kwargs.depths ...`): the recipe then keeps it."""
    keys = (a[2:].replace("-", "_").split("=")[0] for a in overrides if a.startswith("--"))
    return "convnext_atto" if any(k.startswith("model.kwargs.") for k in keys) else None


def _given(overrides: list[str], name: str, kind: type) -> Any:
    """The value of `--name` among the raw override flags (`--a.b v` or `--a.b=v`, dashes or underscores)."""
    for i, a in enumerate(overrides):
        key = a[2:].replace("-", "_") if a.startswith("--") else None
        if key == name and i + 1 < len(overrides):
            return kind(overrides[i + 1])
        if key is not None and key.startswith(name + "="):
            return kind(key.split("=", 1)[1])
    return None

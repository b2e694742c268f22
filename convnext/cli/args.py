"""What the command families share: argument types for counts and sizes that must be positive, and the config
flags of every command that trains (`--config FILE`, dotted flags, `--print-config`) read through
`convnext.config`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from convnext.config import apply_overrides, from_dict, parse_overrides, read_config_file, to_dict

T = TypeVar("T")


def positive_int(text: str) -> int:
    """An integer >= 1 (`--epochs`, `--batch-size`, `--img-size`, `--topk`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (`--budget-min`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


# ---------------------------------------------------------------- the config of a command that trains
def add_config_flags(p: argparse.ArgumentParser) -> None:
    """`--config FILE`, `--print-config`, and any config field as a dotted flag (`--optim.lr 1e-3`)."""
    p.add_argument(
        "--config", default=None, metavar="FILE", help="config fields from a .json or .yaml file (a run's "
        "config.json or --print-config output works; a \"preset\" key picks the preset); other flags override it",
    )  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(accepts_overrides=True)


def add_run_args(p: argparse.ArgumentParser, epochs_help: str | None = None, img_size_help: str | None = None) -> None:
    """The flags every command that trains on a folder takes (`convnext train`, `convnext pretrain`); `run_flags`
    maps them onto their config fields."""
    p.add_argument("--epochs", type=positive_int, default=None, help=epochs_help)
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch per optimizer step")
    p.add_argument("--img-size", type=positive_int, default=None, help=img_size_help)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", default=None, help="where cifar10/cifar100 are (or get downloaded)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images")
    p.add_argument("--budget-min", type=positive_float, default=None, help="wall-clock training budget in minutes")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output")


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """`add_run_args`' flags (and --data, --output) as config fields; None: not given."""
    return {
        "data.name": args.data,
        "output": args.output,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "data.img_size": args.img_size,
        "seed": args.seed,
        "device": args.device,
        "data.data_dir": args.data_dir,
        "budget_min": args.budget_min,
        "data.skip_bad_images": args.skip_bad_images or None,
        "overwrite": args.overwrite or None,
        "resume": args.resume,
    }


def build_config(
    args: argparse.Namespace, cls: type[T], start: Callable[[dict[str, Any]], T], flags: dict[str, Any]
) -> T:
    """The command's config, every source checked against `cls` before any work: `start(given)` (the preset, or
    the run to resume; `given` holds the fields the --config file and the dotted flags set, `{"optim.lr": 1e-3}`,
    a flag's over the file's, and the file's "preset"), then the file's fields, the command's own `flags` (None:
    not given) and the dotted flags, each over the one before."""
    file = read_config_file(args.config, cls, keep=("preset",)) if args.config else {}
    dotted = parse_overrides(args.overrides, cls)
    if getattr(args, "resume", None) and args.config:
        raise ValueError("--resume continues a run with its own config.json; drop --config")
    cfg = start(file | dotted)
    file.pop("preset", None)
    apply_overrides(cfg, file, source=args.config)
    apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None})
    return apply_overrides(cfg, dotted)


def run_config(run_dir: str, cls: type[T]) -> T:
    """The config saved in a run folder, to resume it."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    return from_dict(read_config_file(path, cls), cls, source=str(path))


def print_config(cfg: Any) -> None:
    """`--print-config`: the resolved config as JSON (what `--config` reads back to the same config)."""
    print(json.dumps(to_dict(cfg), indent=2))


MODEL_HELP = ("registered name (convnext_tiny, convnext_tiny.fb_in1k), a training run folder or its best.pt / last.pt, "
              "a weight file, a pretrained folder, hf-hub:ORG/NAME or an .onnx from `convnext export`")  # fmt: skip


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--checkpoint", default=None, help="weights in any layout loaded into MODEL (or alone: any source)")
    p.add_argument("--pretrained", action="store_true", help="load the name's published weights")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")


def device_of(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(name: str, device=None):
    """The autocast dtype `--amp` names; "auto": bf16 on a GPU that has it, fp16 on an older one, none on the CPU."""
    import torch

    from convnext.engine.loop import resolve_amp

    name = resolve_amp(name, device or torch.device("cpu"))
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def workers_for(requested: int | None, device) -> int:
    """DataLoader workers for eval/predict: as asked, or (None) none on the CPU (decoding shares the cores with the
    model) and the machine's cores on a GPU."""
    from convnext.engine.loop import cuda_switches, loader_workers

    cuda_switches(device)  # TF32 and cudnn.benchmark on a GPU; nothing on the CPU
    return loader_workers(requested) if requested is not None or device.type == "cuda" else 0


def resolve_args(args: argparse.Namespace, ema: bool = False, img_size: int | None = None):
    """What the model and --checkpoint arguments name (`convnext.resolve`): a checkpoint is loaded into the model
    named beside it, or, alone, is the source."""
    from convnext.resolve import resolve

    if args.checkpoint is not None:
        return resolve(args.checkpoint, model=args.model, ema=ema, img_size=img_size)
    if args.model is None:
        raise ValueError("name a model (a registered name, a run folder, a weight file, an hf-hub: repo) or give "
                         "--checkpoint")  # fmt: skip
    return resolve(args.model, pretrained=args.pretrained, ema=ema, img_size=img_size)


def warn_random(loaded) -> None:
    if loaded.random:
        print(
            f"warning: {loaded.name} has random weights; pass --pretrained, --checkpoint FILE or a run folder",
            file=sys.stderr,
        )

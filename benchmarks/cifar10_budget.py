"""CIFAR-10 under a fixed CPU budget: our ConvNeXt recipe vs timm's convnext_atto vs torchvision's ResNet-18.

All three train under the same loop (`convnext.train.fit`), on the same data (CIFAR-10 from
`../shared/data/cifar10-jpg.tar`, 50,000 train / 10,000 test JPEGs) for the same wall-clock budget on the same
number of threads:

- ours: what `convnext train --data FOLDER --budget-min B` does with no preset, the `auto` recipe
  (`convnext/train/auto.py`: stem, crops, schedule and data path chosen from the data and the budget);
- timm: `timm.create_model("convnext_atto", patch_size=2)` (its CIFAR stem: stride 2, then stride 2 again in
  stage 0) under the `cifar10` preset (AdamW, warmup + cosine fitted to the budget, pad-and-crop + flip, label
  smoothing, images decoded per epoch by a worker, as a plain training loop does);
- resnet18: torchvision's ResNet-18 adapted to CIFAR as usual (3x3 stride-1 stem conv, no max-pool), the same.

The budget covers training only; each model is then evaluated once on the full test set.

    python benchmarks/cifar10_budget.py                    # 10 minutes per model, 2 threads
    python benchmarks/cifar10_budget.py --budget-min 0.3 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch import nn

from convnext.train import apply_overrides, auto_recipe, build_model, fit, get_preset

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar"


def extract(tar: Path, cache: Path) -> Path:
    """Unpack the CIFAR-10 JPEG tar once into `cache`; returns the image folder (train/ and test/)."""
    folder = cache / "cifar10-images"
    done = cache / ".cifar10-images.done"
    if done.exists():
        return folder
    if not tar.is_file():
        raise FileNotFoundError(f"{tar} not found: pass --tar PATH to cifar10-jpg.tar")
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        t.extractall(cache, filter="data")
    done.write_text(str(tar) + "\n")
    return folder


def test_subset(folder: Path, per_class: int) -> Path:
    """A view of `folder` with the first `per_class` test images of each class (symlinks; for quick checks)."""
    sub = folder.parent / f"cifar10-images-test{per_class}"
    if not sub.exists():
        (sub / "train").parent.mkdir(parents=True, exist_ok=True)
        (sub / "train").symlink_to((folder / "train").resolve(), target_is_directory=True)
        for cls in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
            (sub / "test" / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                (sub / "test" / cls.name / f.name).symlink_to(f.resolve())
    return sub


def timm_convnext_atto() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10, patch_size=2)


def resnet18_cifar() -> nn.Module:
    import torchvision

    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


PEERS = {"ours": None, "timm_convnext_atto": timm_convnext_atto, "resnet18": resnet18_cifar}


def run(name: str, folder: Path, args: argparse.Namespace) -> dict:
    common = {
        "budget_min": args.budget_min,
        "threads": args.threads,
        "device": "cpu",
        "seed": args.seed,
        "eval_every": 10**6,  # evaluate once, after the budget
        "output": str(Path(args.output) / name),
        "overwrite": True,
    }
    if name == "ours":
        cfg = auto_recipe(str(folder), budget_min=args.budget_min, threads=args.threads)
        apply_overrides(cfg, common)
    else:
        cfg = get_preset("cifar10")
        apply_overrides(
            cfg,
            common
            | {
                "data.name": str(folder),
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "data.num_workers": args.workers,
                "data.cache": "off",
            },
        )
    if name == "ours" and args.ours:
        apply_overrides(cfg, [f"--{kv}" for kv in args.ours])
    module = None
    if PEERS[name] is not None:
        torch.manual_seed(args.seed)
        module = PEERS[name]()
        cfg.model.name = f"peer:{name}"
    t = time.perf_counter()
    r = fit(cfg, model=module)
    counted = module if module is not None else build_model(cfg.model, 10, init_weights=False)
    params = sum(p.numel() for p in counted.parameters())
    return {
        "model": name,
        "params": params,
        "top1": round(r["top1"], 2),
        "top5": round(r["top5"], 2),
        "train_img_per_s": round(r["img_per_s"] or 0.0, 1),
        "steps": r["steps"],
        "epochs_seen": round(r["steps"] * cfg.batch_size / 50000, 2),
        "recipe": "auto" if name == "ours" else "cifar10 preset",
        "test_images": r["n"],
        "budget_min": args.budget_min,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.add_argument("--batch-size", type=int, default=256, help="the peers' batch (ours: the auto recipe's)")
    p.add_argument("--epochs", type=int, default=100, help="the peers' upper bound; the budget ends training first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override our recipe, e.g. --ours model.patch_size=4 (repeatable)",
    )
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "data")
    p.add_argument("--output", default=str(ROOT / "runs" / "cifar10_budget"))
    p.add_argument("--test-per-class", type=int, default=None, help="evaluate on this many test images per class")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    folder = extract(args.tar, args.cache)
    if args.test_per_class:
        folder = test_subset(folder, args.test_per_class)
    rows = [run(name, folder, args) for name in args.models.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "cifar10_budget", "torch": torch.__version__, "results": rows}))
        return 0
    n = rows[0]["test_images"]
    print(f"\nCIFAR-10, {args.budget_min:g} min of training per model on {args.threads} CPU threads, same loop and")
    print(f"ours with the auto recipe, the peers with the `cifar10` preset; top-1/top-5 on {n} test images")
    print("| model | params | test top-1 | test top-5 | train img/s | steps | epochs seen |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['top1']:.2f} | {r['top5']:.2f} | "
            f"{r['train_img_per_s']:.0f} | {r['steps']} | {r['epochs_seen']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

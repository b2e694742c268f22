"""Class imbalance A/B: plain training vs class-balanced sampling vs inverse-frequency loss weights
(`--data.balance none|sampler|weights`) on the automatic recipe at a fixed number of epochs, scored by the held-out
macro-F1 and top-1, on atto at a quarter of its blocks with the recipe's 4x4 stem (no budget), evaluated once at the
end (the recipe's flip/shift views). The data: CIFAR-10 made long-tailed (class i keeps head x ratio^(-i/9) of its
training images, Cui et al. 2019's profile; the test set stays balanced) and CamVid 128 px patches as they come (the
natural class frequencies of `folder_vs_resnet18.make_camvid_patches`, uncapped in train, up to 100 a class in val).

    python benchmarks/imbalance.py --cifar /tmp/lt/cifar10-images --ratios 100 10 --out /tmp/lt --epochs 10
    python benchmarks/imbalance.py --camvid /tmp/lt/CamVid --out /tmp/lt --epochs 10 --img-size 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from folder_vs_resnet18 import make_camvid_patches  # noqa: E402

from convnext.train import auto_recipe, fit  # noqa: E402
from convnext.train.auto import QUARTER  # noqa: E402

ARMS = ("none", "sampler", "weights")


def make_long_tailed(cifar: Path, out: Path, ratio: float, head: int = 500, test_per_class: int = 200) -> Path:
    """out/train/<class>: head x ratio^(-i/9) images of class i (the first ones by name); out/val/<class>: the first
    `test_per_class` of CIFAR-10's test images (balanced)."""
    classes = sorted(p.name for p in (cifar / "train").iterdir())
    for i, c in enumerate(classes):
        keep = max(round(head * ratio ** (-i / (len(classes) - 1))), 1)
        for split, n in (("train", keep), ("test", test_per_class)):
            dst = out / ("val" if split == "test" else "train") / c
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted((cifar / split / c).glob("*.jpg"))[:n]:
                shutil.copy(f, dst / f.name)
    return out


def run(data: Path, out: Path, epochs: int, img_size: int, seed: int, threads: int) -> list[dict]:
    rows = []
    for arm in ARMS:
        cfg = auto_recipe(str(data), epochs=epochs, img_size=img_size, balance=arm, threads=threads, device="cpu")
        cfg.output, cfg.overwrite, cfg.seed, cfg.threads = str(out / f"{data.name}-{arm}-s{seed}"), True, seed, threads
        cfg.model.kwargs, cfg.eval_every = dict(QUARTER), 0  # the small model; one evaluation, at the end
        r = fit(cfg)
        rows.append({"data": data.name, "arm": arm, "seed": seed, "epochs": epochs, "macro_f1": r["macro_f1"],
                     "balanced_accuracy": r["balanced_accuracy"], "top1": r["top1"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar", type=Path, help="the unpacked cifar10-images folder")
    p.add_argument("--ratios", type=float, nargs="*", default=[100.0, 10.0])
    p.add_argument("--head", type=int, default=200, help="training images of the largest class")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--camvid", type=Path, help="the unpacked CamVid folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    sets = []
    if args.cifar:
        for ratio in args.ratios:
            d = args.out / f"cifar10-lt{ratio:g}"
            if not d.exists():
                make_long_tailed(args.cifar, d, ratio, args.head, args.test_per_class)
            sets.append(d)
    if args.camvid:
        d = args.out / "camvid128"
        if not d.exists():
            make_camvid_patches(args.camvid, d, side=128, per_train=10**6, per_val=100)
        sets.append(d)
    for d in sets:
        for seed in args.seeds:
            run(d, args.out / "runs", args.epochs, args.img_size, seed, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""An image folder under a fixed CPU budget: the README's folder command against a plain ResNet-18 loop.

Issue 14's check on held-back photos: `convnext train --data DIR --output RUN --img-size S --budget-min B`, then
`convnext eval --checkpoint RUN --data DIR --json`, exactly as a user runs them, against torchvision's ResNet-18
(its ImageNet stem: 7x7 stride 2 and max-pool) in a plain AdamW loop for the same minutes on the same threads:
images held in memory as PIL, RandomResizedCrop(S, area 35-100%) + flip per image, batch 64, lr 1e-3 with a 3%
warmup and a cosine to zero at the budget (by elapsed time), wd 0.05, label smoothing 0.1; scored with a resize to
S/0.875 and a centre crop. The folder holds train/<class>/ and val/<class>/ (or test/).

With no photo set at hand, `--from-cifar DIR` builds a stand-in first: 500 training images per class (not the
first 1,000) and 200 test images per class of the unpacked CIFAR-10 JPEGs, upscaled to 96 px (so the recipe
takes its photo path: random-resized crops from a margin).

    python benchmarks/folder_vs_resnet18.py --data /tmp/c96 --from-cifar /tmp/data/cifar10-images
    python benchmarks/folder_vs_resnet18.py --data /tmp/c96_1k --from-cifar /tmp/data/cifar10-images --per-class 1000
    python benchmarks/folder_vs_resnet18.py --data PHOTOS --img-size 64 --budget-min 10 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


def make_stand_in(
    cifar: Path, out: Path, side: int = 96, per_train: int = 500, per_val: int = 200, skip: int = 1000
) -> None:
    """`per_train` images per class of `cifar`/train after the first `skip`, and the first `per_val` of
    `cifar`/test, resized to `side` px, as `out`/train and `out`/val."""
    from PIL import Image

    for split, dst, per, first in (("train", "train", per_train, skip), ("test", "val", per_val, 0)):
        classes = sorted(p for p in (cifar / split).iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"{cifar / split}: no class folders (pass the unpacked cifar10-images folder)")
        for cls in classes:
            d = out / dst / cls.name
            d.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[first : first + per]:
                with Image.open(f) as im:
                    im.convert("RGB").resize((side, side), Image.BICUBIC).save(d / f.name, quality=92)


def ours(data: Path, out: Path, size: int, minutes: float, threads: int, seed: int = 0) -> dict:
    """The README's two commands, run as a user runs them (`--seed` only when not 0)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    exe = [sys.executable, "-m", "convnext"]
    train = [*exe, "train", "--data", str(data), "--output", str(out), "--img-size", str(size)]
    seeded = ["--seed", str(seed)] if seed else []
    subprocess.run([*train, "--budget-min", str(minutes), *seeded, "--overwrite"], check=True, env=env)
    got = subprocess.run(
        [*exe, "eval", "--checkpoint", str(out), "--data", str(data), "--json"],
        check=True, env=env, capture_output=True, text=True,
    )  # fmt: skip
    scores = json.loads(got.stdout.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    return {
        "model": "ours (README folder command)",
        "top1": scores["top1"],
        "img_per_s": round(results.get("img_per_s") or 0.0, 1),
    }


def resnet18_loop(data: Path, size: int, minutes: float, threads: int, seed: int = 0) -> dict:
    import torchvision
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), norm])
    val_dir = next((data / n for n in ("val", "validation", "test") if (data / n).is_dir()), None)
    if val_dir is None:
        raise FileNotFoundError(f"{data}: no val/ (or validation/, test/) folder")
    train, val = ImageFolder(str(data / "train")), ImageFolder(str(val_dir))
    images = [(train.loader(p), y) for p, y in train.samples]
    model = torchvision.models.resnet18(num_classes=len(train.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    budget, batch, seen, start = minutes * 60, min(64, len(images)), 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        order = torch.randperm(len(images)).tolist()
        for i in range(0, len(order) - batch + 1, batch):
            frac = (time.perf_counter() - start) / budget
            if frac >= 1:
                break
            for g in opt.param_groups:
                g["lr"] = 1e-3 * (frac / 0.03 if frac < 0.03 else 0.5 * (1 + math.cos(math.pi * frac)))
            x = torch.stack([train_tf(images[j][0]) for j in order[i : i + batch]])
            y = torch.tensor([images[j][1] for j in order[i : i + batch]])
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += batch
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val.samples), 200):
            chunk = val.samples[i : i + 200]
            x = torch.stack([test_tf(val.loader(p)) for p, _ in chunk])
            correct += (model(x).argmax(1) == torch.tensor([c for _, c in chunk])).sum().item()
    top1 = round(100 * correct / len(val.samples), 2)
    return {"model": "torchvision resnet18 (plain AdamW loop)", "top1": top1, "img_per_s": round(seen / budget, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="image folder with train/ and val/ (or test/)")
    p.add_argument("--from-cifar", type=Path, help="build the stand-in at --data from this unpacked CIFAR-10 folder")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=Path("runs/folder_vs_resnet18"))
    p.add_argument("--per-class", type=int, default=500, help="stand-in training images per class")
    p.add_argument("--seed", type=int, default=0, help="both models' seed")
    p.add_argument("--models", default="ours,resnet18", help="comma-separated: ours, resnet18")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.from_cifar is not None and not (args.data / "train").is_dir():
        make_stand_in(args.from_cifar, args.data, per_train=args.per_class)
    if not (args.data / "train").is_dir():
        p.error(f"--data {args.data}: no train/ folder")
    runs = {
        "ours": lambda: ours(args.data, args.output / "ours", args.img_size, args.budget_min, args.threads, args.seed),
        "resnet18": lambda: resnet18_loop(args.data, args.img_size, args.budget_min, args.threads, args.seed),
    }
    wanted = args.models.split(",")
    if unknown := [m for m in wanted if m not in runs]:
        p.error(f"--models: unknown {', '.join(unknown)} (ours, resnet18)")
    rows = [runs[m]() for m in wanted]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{args.data}, {args.img_size} px, {args.budget_min} min each, {args.threads} threads")
        for r in rows:
            print(f"{r['model']:45s} top-1 {r['top1']:6.2f}  {r['img_per_s']} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

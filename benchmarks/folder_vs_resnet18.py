"""An image folder under a fixed CPU budget: the README's folder command against a plain ResNet-18 loop.

Issue 14's check on held-back photos: `convnext train --data DIR --output RUN --img-size S --budget-min B`, then
`convnext eval --checkpoint RUN --data DIR --json`, exactly as a user runs them, against torchvision's ResNet-18
(its ImageNet stem: 7x7 stride 2 and max-pool) in a plain AdamW loop for the same minutes on the same threads:
images held in memory as PIL, RandomResizedCrop(S, area 35-100%) + flip per image, batch 64, lr 1e-3 with a 3%
warmup and a cosine to zero at the budget (by elapsed time), wd 0.05, label smoothing 0.1; scored with a resize to
S/0.875 and a centre crop. The folder holds train/<class>/ and val/<class>/ (or test/).

With no photo set at hand, `--from-cifar DIR` builds a stand-in first: 500 training images per class (not the
first 1,000) and 200 test images per class of the unpacked CIFAR-10 JPEGs, upscaled to 96 px (so the recipe
takes its photo path: random-resized crops from a margin). Two stand-ins of real photos come from the other shared
data: `--from-camvid DIR` cuts CamVid's road scenes into square patches labelled by the class covering 60% of them
(sky, building, road, pavement, tree, car; training patches from the train and val sequences, scored ones from the
test sequences), and `--from-pennfudan DIR` crops Penn-Fudan's pedestrians and as many background windows of the
same shapes, scaled down where no window that large is free (120 images for training, the last 50 scored).

    python benchmarks/folder_vs_resnet18.py --data /tmp/c96 --from-cifar /tmp/data/cifar10-images
    python benchmarks/folder_vs_resnet18.py --data /tmp/c96_1k --from-cifar /tmp/data/cifar10-images --per-class 1000
    python benchmarks/folder_vs_resnet18.py --data /tmp/camvid64 --from-camvid runs/data/CamVid --budget-min 5
    python benchmarks/folder_vs_resnet18.py --data /tmp/camvid128 --from-camvid runs/data/CamVid --patch 128
    python benchmarks/folder_vs_resnet18.py --data /tmp/peds --from-pennfudan runs/data/PennFudanPed --budget-min 3
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
from typing import Any

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


CAMVID_CLASSES = {0: "sky", 1: "building", 3: "road", 4: "pavement", 5: "tree", 8: "car"}


def make_camvid_patches(
    camvid: Path, out: Path, side: int = 64, per_train: int = 1000, per_val: int = 300, seed: int = 0
) -> None:
    """Square `side` px windows (stride side/2) of CamVid's images whose label map is 60% one class of
    `CAMVID_CLASSES` (void counted as not that class), as `out`/train (up to `per_train` a class, from the train and
    val sequences) and `out`/val (up to `per_val` a class, from the test sequences), chosen at random with `seed`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for splits, dst, per in ((("train", "val"), "train", per_train), (("test",), "val", per_val)):
        found: dict[int, list[tuple[Path, int, int]]] = {c: [] for c in CAMVID_CLASSES}
        for split in splits:
            labels = sorted((camvid / f"{split}annot").glob("*.png"))
            if not labels:
                raise FileNotFoundError(f"{camvid}/{split}annot: no label maps (pass the unpacked CamVid folder)")
            for f in labels:
                with Image.open(f) as im:
                    a = np.asarray(im)
                for y in range(0, a.shape[0] - side + 1, side // 2):
                    for x in range(0, a.shape[1] - side + 1, side // 2):
                        counts = np.bincount(a[y : y + side, x : x + side].ravel(), minlength=12)
                        c = int(counts[:11].argmax())
                        if c in found and counts[c] >= 0.6 * side * side:
                            found[c].append((camvid / split / f.name.replace(".png", ".jpg"), x, y))
        for c, windows in found.items():
            d = out / dst / CAMVID_CLASSES[c]
            d.mkdir(parents=True, exist_ok=True)
            for i in sorted(rng.permutation(len(windows))[:per]):
                path, x, y = windows[i]
                with Image.open(path) as im:
                    im.convert("RGB").crop((x, y, x + side, y + side)).save(d / f"{path.stem}_{x}_{y}.jpg", quality=92)


def make_pedestrian_crops(pennfudan: Path, out: Path, n_train_images: int = 120, seed: int = 0) -> None:
    """Penn-Fudan's pedestrians (their mask's box plus 10% each side) as `pedestrian`, and for each one a window of
    the same size at a random place that overlaps no pedestrian's box as `background`: the first `n_train_images`
    images (sorted by name) as `out`/train, the rest as `out`/val."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = sorted((pennfudan / "PNGImages").glob("*.png"))
    if not images:
        raise FileNotFoundError(f"{pennfudan / 'PNGImages'}: no images (pass the unpacked PennFudanPed folder)")
    for n, path in enumerate(images):
        split = "train" if n < n_train_images else "val"
        for cls in ("pedestrian", "background"):
            (out / split / cls).mkdir(parents=True, exist_ok=True)
        with Image.open(pennfudan / "PedMasks" / f"{path.stem}_mask.png") as im:
            mask = np.asarray(im)
        with Image.open(path) as im:
            im = im.convert("RGB")
            boxes = []
            for k in range(1, int(mask.max()) + 1):
                ys, xs = np.nonzero(mask == k)
                if len(xs):
                    boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                mx, my = (x1 - x0) // 10, (y1 - y0) // 10
                box = (max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, im.width), min(y1 + my, im.height))
                im.crop(box).save(out / split / "pedestrian" / f"{path.stem}_{k}.jpg", quality=92)
                for scale in np.repeat((1.0, 0.75, 0.5, 0.35), 50):  # a free window of this shape, as large as fits
                    bw, bh = int((box[2] - box[0]) * scale), int((box[3] - box[1]) * scale)
                    bx, by = int(rng.integers(0, im.width - bw + 1)), int(rng.integers(0, im.height - bh + 1))
                    if all(bx + bw <= a or a2 <= bx or by + bh <= b or b2 <= by for a, b, a2, b2 in boxes):
                        im.crop((bx, by, bx + bw, by + bh)).save(out / split / "background" / f"{path.stem}_{k}.jpg")
                        break


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
    top1 = held_out_top1(model, val, test_tf)
    return {"model": "torchvision resnet18 (plain AdamW loop)", "top1": top1, "img_per_s": round(seen / budget, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="image folder with train/ and val/ (or test/)")
    p.add_argument("--from-cifar", type=Path, help="build the stand-in at --data from this unpacked CIFAR-10 folder")
    p.add_argument("--from-camvid", type=Path, help="build CamVid patches at --data from this unpacked CamVid folder")
    p.add_argument("--patch", type=int, default=64, help="CamVid patch side in px")
    p.add_argument("--from-pennfudan", type=Path, help="build pedestrian crops at --data from unpacked PennFudanPed")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--budget-min", type=float, default=10.0, help="training minutes per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=Path("runs/folder_vs_resnet18"))
    p.add_argument("--per-class", type=int, default=500, help="stand-in training images per class")
    p.add_argument("--seed", type=int, default=0, help="both models' seed")
    p.add_argument("--models", default="ours,resnet18", help="comma-separated: ours, resnet18")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (args.data / "train").is_dir():  # build the stand-in asked for
        if args.from_cifar is not None:
            make_stand_in(args.from_cifar, args.data, per_train=args.per_class)
        elif args.from_camvid is not None:
            make_camvid_patches(args.from_camvid, args.data, side=args.patch)
        elif args.from_pennfudan is not None:
            make_pedestrian_crops(args.from_pennfudan, args.data)
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


def held_out_top1(model: nn.Module, val: Any, test_tf: Any) -> float:
    """Top-1 (%) of `model` on an ImageFolder `val` through `test_tf`, in eval mode, 200 images at a time."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val.samples), 200):
            chunk = val.samples[i : i + 200]
            x = torch.stack([test_tf(val.loader(p)) for p, _ in chunk])
            correct += (model(x).argmax(1) == torch.tensor([c for _, c in chunk])).sum().item()
    return round(100 * correct / len(val.samples), 2)

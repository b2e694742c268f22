"""FCMAE on CIFAR-10 with 10% of the labels (issue 17's target): is self-supervised pre-training on all 50,000
training images worth its minutes when only 5,000 of them (500 per class, seeded) are labelled?

Three commands, run as a user runs them, on the same threads:

1. `convnext pretrain --data CIFAR --img-size 64 --model.patch_size 2 --budget-min B`: FCMAE on the 50,000 train
   images (labels unused), upscaled to 64 px, 16 px patches on a 4x4 grid;
2. `convnext train --data LABELLED --pretrained-run RUN --img-size 32 --budget-min B`: fine-tuning on the 5,000 at
   CIFAR's own 32 px (the 2x2 stem unchanged: a 16x16 token grid), the `auto` recipe;
3. `convnext train --data LABELLED --model M --model.patch_size 2 --img-size 32 --budget-min 2B`: the same network
   and recipe from scratch on the same 5,000 images, for the minutes of both steps together.

Both are scored with their final weights (no checkpoint selection) on the 10,000 test images, the labelled
folder's val split: the top-1 each train run's results.json reports.

    python benchmarks/fcmae_cifar10.py --data /tmp/data/cifar10-images --out benchmarks/results/fcmae_cifar10.md
    python benchmarks/fcmae_cifar10.py --data /tmp/data/cifar10-images --budget-min 0.2 --out /tmp/fcmae.md  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from convnext.cli.core import system_info

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def labelled_subset(cifar: Path, out: Path, per_class: int, seed: int) -> Path:
    """`out`/train/<class>/: `per_class` images of each class of `cifar`/train, drawn with `seed` (symbolic links),
    and `out`/test: a link to `cifar`/test. Returns `out`; an existing subset of the same draw is kept."""
    stamp = out / "subset.json"
    want = {"source": str(cifar.resolve()), "per_class": per_class, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out
    classes = sorted(p for p in (cifar / "train").iterdir() if p.is_dir())
    if not classes or not (cifar / "test").is_dir():
        raise FileNotFoundError(f"{cifar}: expected train/<class>/ and test/<class>/ (the unpacked CIFAR-10 images)")
    rng = np.random.default_rng(seed)
    for cls in classes:
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < per_class:
            raise ValueError(f"{cls}: {len(files)} images, fewer than --per-class {per_class}")
        d = out / "train" / cls.name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for i in sorted(rng.choice(len(files), per_class, replace=False)):
            (d / files[i].name).symlink_to(files[i].resolve())
    test = out / "test"
    if test.is_symlink() or test.exists():
        test.unlink()
    test.symlink_to((cifar / "test").resolve(), target_is_directory=True)
    stamp.write_text(json.dumps(want) + "\n")
    return out


def convnext(*args: str, threads: int) -> None:
    """`python -m convnext ARGS` with `threads` threads, its output passed through; raises if it fails."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    print("$ convnext " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "convnext", *args, "--threads", str(threads)], check=True, env=env)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the unpacked CIFAR-10 images (train/ and test/)")
    p.add_argument("--budget-min", type=float, default=10.0, help="B: pre-training and fine-tuning minutes each")
    p.add_argument("--out", type=Path, required=True, help="write the markdown table here")
    p.add_argument("--work", type=Path, default=Path("runs/fcmae_cifar10"), help="run folders and the subset")
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-class", type=int, default=500, help="labelled images per class")
    p.add_argument("--seed", type=int, default=0, help="the subset's draw and every run's seed")
    args = p.parse_args(argv)

    b, t, work = args.budget_min, args.threads, args.work
    labelled = labelled_subset(args.data, work / "labelled", args.per_class, args.seed)
    seed = ["--seed", str(args.seed), "--overwrite"]
    pre, ft, sup = work / "fcmae", work / "finetune", work / "supervised"
    started = time.time()
    convnext("pretrain", "--model", args.model, "--data", str(args.data), "--output", str(pre), "--img-size", "64",
             "--model.patch_size", "2", "--budget-min", str(b), *seed, threads=t)  # fmt: skip
    convnext("train", "--data", str(labelled), "--output", str(ft), "--pretrained-run", str(pre), "--img-size", "32",
             "--budget-min", str(b), *seed, threads=t)  # fmt: skip
    convnext("train", "--data", str(labelled), "--output", str(sup), "--model", args.model, "--model.patch_size", "2",
             "--img-size", "32", "--budget-min", str(2 * b), *seed, threads=t)  # fmt: skip

    r_pre, r_ft, r_sup = results(pre), results(ft), results(sup)
    labels = 10 * args.per_class
    rows = [
        ("FCMAE pre-training (50,000 images, no labels), then fine-tuning", f"{b:g} + {b:g}", r_ft,
         f"{r_pre['epochs']} + {r_ft['epochs']}", f"{r_pre['img_per_s']:.0f} / {r_ft['img_per_s']:.0f}"),
        ("supervised from scratch", f"{2 * b:g}", r_sup, f"{r_sup['epochs']}", f"{r_sup['img_per_s']:.0f}"),
    ]  # fmt: skip
    lines = [
        f"# FCMAE on CIFAR-10 with {labels:,} labels ({args.per_class} per class, seed {args.seed})",
        "",
        f"{args.model} with a 2x2 stem, {t} threads, {system_info()['cpu']}, "
        f"python {platform.python_version()}; pre-training at 64 px (16 px patches, 4x4 grid, 60% masked, "
        f"val loss {r_pre['loss']:.4f}), training at 32 px; top-1 of the final weights on the 10,000 test images.",
        "",
        "| arm | minutes | top-1 (%) | epochs | train img/s |",
        "|---|---|---|---|---|",
        *(f"| {name} | {minutes} | {r['top1']:.2f} | {epochs} | {rate} |" for name, minutes, r, epochs, rate in rows),
        "",
        f"Wall time {(time.time() - started) / 60:.1f} min (set-up, decoding and evaluation outside the budgets).",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

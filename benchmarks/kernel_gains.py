"""What each C kernel buys on the real jobs: `convnext train` on an image folder and `convnext bench` (optimize).

Issue 15: a kernel stays only where it gives >= 3% on a real job. All four are float32 CPU training kernels
(`convnext.optimize`'s inference runs none of them). Each job runs as a user runs it, in a fresh process, once with
every kernel on and once with each kernel switched off (`CONVNEXT_KERNELS_OFF`, which sends that op to aten's path),
the variants interleaved over `--rounds` rounds, each round starting at the next variant, so a slow phase of a
shared machine falls on all of them alike. Training speed is the median `img_per_s` over the run's epochs in
`metrics.csv`; the training step of `convnext bench --train --json` its images/s. Nothing else may run on the
machine meanwhile.

    python benchmarks/kernel_gains.py --data /tmp/data/cifar10-images --threads 2 --rounds 2 --out FILE.md

The training jobs (fixed configs, so every variant trains the same model on the same batches):
- `cifar32`: the auto recipe's CIFAR-10 choice: atto at a quarter of its blocks, 2x2 stem, 32 px, batch 128;
- `cifar32_p4`: the same with the 4x4 stem (the recipe's choice when the machine runs slower);
- `photo64`: atto with a 4x4 stem at 64 px (the recipe's photo-path choice), batch 128.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = ("depthwise", "gelu", "layer_norm", "mlp")
QUARTER = ["--model.kwargs.depths", "[1,1,2,1]", "--model.kwargs.dims", "[32,64,128,256]"]
TRAIN_JOBS = {
    "cifar32": ["--img-size", "32", "--model.patch_size", "2", *QUARTER],
    "cifar32_p4": ["--img-size", "32", "--model.patch_size", "4", *QUARTER],
    "photo64": ["--img-size", "64", "--model.patch_size", "4"],
}
BENCH_JOBS = {  # the README's training-step figure (ConvNeXt-T, float32, batch 16); inference uses none of them
    "tiny224_train_b16": ["convnext_tiny", "--batch", "16", "--img-size", "224", "--train", "--no-grad-ckpt"],
}


def subset(data: Path, out: Path, per_class: int, per_val: int) -> Path:
    """`per_class` training and `per_val` test images per class of `data`, as symlinks (decoding stays short)."""
    if out.exists():
        return out
    for split, n in (("train", per_class), ("test", per_val)):
        for cls in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            (out / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                (out / split / cls.name / f.name).symlink_to(f.resolve())
    return out


def train_rate(data: Path, job: list[str], off: str, threads: int, epochs: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CONVNEXT_KERNELS_OFF": off}
    with tempfile.TemporaryDirectory() as run:
        cmd = [sys.executable, "-m", "convnext", "train", "--data", str(data), "--output", f"{run}/r",
               "--epochs", str(epochs), "--threads", str(threads), *job]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        lines = (Path(run) / "r" / "metrics.csv").read_text().splitlines()
        col = lines[0].split(",").index("img_per_s")
        return statistics.median(float(line.split(",")[col]) for line in lines[1:])


def bench_rate(job: list[str], off: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CONVNEXT_KERNELS_OFF": off}
    cmd = [sys.executable, "-m", "convnext", "bench", *job, "--threads", str(threads), "--json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out[out.index("{") :])["img_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="an image folder with train/ and test/ (CIFAR-10)")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", default=",".join([*TRAIN_JOBS, *BENCH_JOBS]))
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    data = subset(args.data, Path(tempfile.gettempdir()) / f"kernel_gains_{args.per_class}", args.per_class, 200)
    variants = ["", *KERNELS]
    rows = []
    for name in args.jobs.split(","):
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # each round starts elsewhere
                if name in TRAIN_JOBS:
                    r = train_rate(data, TRAIN_JOBS[name], v, args.threads, args.epochs)
                else:
                    r = bench_rate(BENCH_JOBS[name], v, args.threads)
                rates[v].append(r)
                print(f"{name} off={v or '-'}: {r:.1f} img/s", flush=True)
        on = statistics.median(rates[""])
        for v in KERNELS:
            off = statistics.median(rates[v])
            rows.append((name, v, on, off, 100 * (on / off - 1)))
    table = ["| job | kernel | img/s all on | img/s kernel off | gain of the kernel |", "|---|---|---|---|---|"]
    table += [f"| {j} | {k} | {a:.1f} | {b:.1f} | {g:+.1f}% |" for j, k, a, b, g in rows]
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()

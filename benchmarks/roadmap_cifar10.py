"""The roadmap ladder on CIFAR-10, then the effective receptive fields of the trained kernel-3 and kernel-7 steps.

    python benchmarks/roadmap_cifar10.py --budget-min 1.5 --output runs/roadmap_cifar10 [--data-dir ../shared/data]

Resumable like `convnext roadmap` (same output folder, same settings). Writes, beside the ladder's table and
figure, `erf_06_vs_07.png` and `erf_06_vs_07.json` (area shares over 64 CIFAR-10 test images).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from convnext.erf import area_shares, erf_map, load_images, plot_erfs
from convnext.resolve import resolve
from convnext.train.roadmap import LadderConfig, resolve_data, run_ladder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, required=True, help="training minutes per step")
    p.add_argument("--output", default="runs/roadmap_cifar10")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--steps", default="0-12")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from convnext.cli.roadmap import parse_steps

    lc = LadderConfig(
        data="cifar10",
        budget_min=args.budget_min,
        steps=tuple(parse_steps(args.steps)),
        output=args.output,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )
    rows = {r["step"]: r for r in run_ladder(lc)}
    print(Path(args.output, "roadmap.md").read_text())

    if 6 in rows and 7 in rows:  # kernel 3 -> 7 on the trained weights
        test_dir = Path(resolve_data(lc.resolved())) / "test"
        maps, report = {}, {}
        for step in (6, 7):
            trained = resolve(rows[step]["run_dir"])
            model, cfg = trained.model, trained.run
            d = cfg["data"]
            images = load_images(test_dir, d["img_size"], 64, d["mean"], d["std"]) if test_dir.is_dir() else None
            if images is None:
                images = torch.randn(64, 3, d["img_size"], d["img_size"])
            maps[rows[step]["name"]] = erf = erf_map(model, torch.split(images, 16))
            report[rows[step]["name"]] = {f"{int(t * 100)}%": s for t, s in area_shares(erf).items()}
        plot_erfs(maps, Path(args.output, "erf_06_vs_07.png"))
        Path(args.output, "erf_06_vs_07.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

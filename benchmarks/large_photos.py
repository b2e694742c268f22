"""Camera-size JPEGs: what `convnext train` costs before its first step, with reduced-scale decoding and without.

A JPEG whose short side is 8+ times the training pipeline's resize is decoded by libjpeg at 1/2, 1/4 or 1/8 scale
(`convnext.data.decode.DRAFT_MARGIN`). This runs the README's folder command twice on the same folder, each in
its own process: as users run it, and with `DRAFT_MARGIN` set so high that every image is decoded at full size.
It prints `setup_s` (scan, decode, plan: `results.json`), the wall time of the whole command and the held-out top-1.

With no photos at hand, `--from-camvid DIR` builds a stand-in first: CamVid's 701 road-scene frames upscaled to
4032x3024 (12 MP, a phone camera's size) and saved as JPEG (quality 90), labelled by their sequence (4 classes),
every 4th frame held out as val.

    OMP_NUM_THREADS=2 python benchmarks/large_photos.py --data /tmp/phones --from-camvid runs/data/CamVid
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUN = (
    "import sys; import convnext.data.decode as d; d.DRAFT_MARGIN = float(sys.argv[1]); "
    "from convnext.cli import main; sys.exit(main(sys.argv[2:]))"
)


def make_phone_folder(camvid: Path, out: Path, size: tuple[int, int] = (4032, 3024), every: int = 4) -> int:
    """CamVid's frames (train, val and test, sorted) resized to `size` as `out`/{train,val}/<sequence>/*.jpg, every
    `every`-th frame in val. Returns the number of images written."""
    from PIL import Image

    splits = [camvid / split for split in ("train", "val", "test")]
    frames = sorted((p for d in splits for p in d.glob("*") if p.suffix in (".png", ".jpg")), key=lambda p: p.name)
    if not frames:
        raise FileNotFoundError(f"{camvid}: no frames in train/, val/ or test/ (pass the unpacked CamVid folder)")
    for i, f in enumerate(frames):
        d = out / ("val" if i % every == 0 else "train") / f.name[:6]
        d.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.convert("RGB").resize(size, Image.BICUBIC).save(d / f"{f.stem}.jpg", quality=90)
    return len(frames)


def run_arm(data: Path, out: Path, margin: float, img_size: int, budget_min: float) -> dict:
    """`convnext train --data DATA ...` in a fresh process with `DRAFT_MARGIN` = margin: setup_s, wall_s, top1."""
    cmd = [sys.executable, "-c", RUN, str(margin), "train", "--data", str(data), "--output", str(out)]
    cmd += ["--img-size", str(img_size), "--budget-min", str(budget_min), "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r = json.loads((out / "results.json").read_text())
    return {"setup_s": round(r["setup_s"], 1), "wall_s": round(wall, 1), "top1": round(r["top1"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--from-camvid", type=Path, help="build --data first from this unpacked CamVid folder")
    p.add_argument("--output", type=Path, default=Path("runs/large_photos"))
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--budget-min", type=float, default=0.2)
    args = p.parse_args()
    if args.from_camvid is not None and not args.data.exists():
        n = make_phone_folder(args.from_camvid, args.data)
        print(f"wrote {n} frames at 4032x3024 to {args.data}")
    from convnext.data.decode import DRAFT_MARGIN

    rows = {
        f"reduced-scale decode (DRAFT_MARGIN {DRAFT_MARGIN})": run_arm(
            args.data, args.output / "draft", DRAFT_MARGIN, args.img_size, args.budget_min
        ),
        "full decode": run_arm(args.data, args.output / "full", 1e9, args.img_size, args.budget_min),
    }
    print(f"| {args.data} at --img-size {args.img_size}, --budget-min {args.budget_min} | setup_s | wall s | top-1 |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['setup_s']} | {r['wall_s']} | {r['top1']} |")
    draft, full = rows.values()
    setup, wall = full["setup_s"] / draft["setup_s"], full["wall_s"] / draft["wall_s"]
    print(f"reduced-scale decoding: setup {setup:.1f}x faster, the whole command {wall:.1f}x")


if __name__ == "__main__":
    main()

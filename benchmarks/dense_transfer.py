"""Transfer to detection and segmentation at one budget: ConvNeXt from scratch, ConvNeXt pre-trained by our own
trainer (a `convnext train` run folder, e.g. on CIFAR-10), and torchvision's ResNet-50 (no weights) as the peer.

Every row trains with the same recipe, the same data and the same wall-clock budget on the same machine, then is
scored once: Penn-Fudan (seeded 120 train / 50 test) with Mask R-CNN -> COCO box and mask AP; CamVid (train 367,
scored on test 233 at full label resolution) with UperNet -> mIoU. No ImageNet weights can be downloaded here, so
"pre-trained" means our own small pre-training: expect small numbers, and read the rows against each other.

    python benchmarks/dense_transfer.py --data ../shared/data --pretrained-run runs/cifar_atto --budget-min 3
    python benchmarks/dense_transfer.py ... --json          # one JSON object instead of the tables
    python benchmarks/dense_transfer.py ... --max-steps 2   # smoke run: a couple of steps per row

Rows are run folders under --out; a row whose results.json exists is reused (delete the folder to redo it), so an
interrupted benchmark continues where it stopped. The results, the config of every row and the environment
are written to --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tarfile
import time
from pathlib import Path

import torch

from convnext.dense.config import camvid, pennfudan
from convnext.dense.train import train_detection, train_segmentation

log = logging.getLogger("dense_transfer")
DETECT_COLS = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")
SEGMENT_COLS = ("mIoU", "aAcc", "mAcc")


def dataset_root(data: Path, cache: Path, tar_name: str, folder: str) -> Path:
    """`data/folder` if it is there, else `cache/folder`, extracted from `data/tar_name` the first time."""
    for candidate in (data / folder, cache / folder):
        if candidate.is_dir():
            return candidate
    tar = data / tar_name
    if not tar.is_file():
        raise FileNotFoundError(f"neither {data / folder} nor {tar} exists")
    log.info("extracting %s to %s", tar, cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        t.extractall(cache, filter="data")
    return cache / folder


def rows(model: str, pretrained_run: str | None) -> list[tuple[str, str, str | None]]:
    """(row name, backbone model, pretrained run) for each row."""
    out = [(f"{model} from scratch", model, None)]
    if pretrained_run:
        out.append((f"{model} pre-trained ({Path(pretrained_run).name})", model, pretrained_run))
    out.append(("ResNet-50 from scratch (torchvision)", "resnet50", None))
    return out


def run_row(task: str, name: str, model: str, pretrained: str | None, root: Path, args: argparse.Namespace) -> dict:
    cfg = pennfudan(model) if task == "detect" else camvid(model)
    cfg.backbone.pretrained_run = pretrained
    cfg.data.root = str(root)
    if task == "segment":
        cfg.data.val_split = "test"  # score on CamVid's test split
    r = cfg.run
    r.output = str(args.out / task / name.split(" (")[0].replace(" ", "_").replace("/", "_"))
    r.eval_every, r.threads, r.num_workers, r.seed = 0, args.threads, args.workers, args.seed
    r.epochs = 1000  # the budget ends training, not the epochs
    if args.max_steps:
        r.max_steps, r.budget_min = args.max_steps, None
    else:
        r.budget_min = args.budget_min
    results = Path(r.output) / "results.json"
    if results.is_file():
        log.info("%s / %s: reusing %s", task, name, results)
        row = json.loads(results.read_text())
    else:
        if Path(r.output).exists():  # an interrupted row: start it again (its budget must be spent in one go)
            r.overwrite = True
        log.info(
            "%s / %s: training for %s", task, name, f"{r.max_steps} steps" if r.max_steps else f"{r.budget_min} min"
        )
        row = (train_detection if task == "detect" else train_segmentation)(cfg)
    row["params_m"] = row["params"] / 1e6
    row["images_seen"] = row["steps"] * r.batch_size
    config = json.loads((Path(r.output) / "config.json").read_text())  # as resolved by the run
    return {"row": name, "task": task, **row, "config": config}


def table(results: list[dict], task: str, cols: tuple[str, ...]) -> str:
    head = ["backbone", "params (M)", "steps", "images seen", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in results if r["task"] == task):
        vals = [f"{100 * r[c]:.1f}" if isinstance(r.get(c), float) and r[c] == r[c] else "-" for c in cols]
        lines.append(
            f"| {r['row']} | {r['params_m']:.1f} | {r['steps']} | {r['images_seen']} | " + " | ".join(vals) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with pennfudan.tar, camvid.tar")
    p.add_argument("--cache", type=Path, default=Path("runs/data"), help="where the tars are extracted")
    p.add_argument("--pretrained-run", default=None, help="a `convnext train` run folder (e.g. CIFAR-10)")
    p.add_argument("--model", default=None, help="backbone (default: the pretrained run's model, else convnext_atto)")
    p.add_argument("--budget-min", type=float, default=3.0, help="training minutes per row")
    p.add_argument("--max-steps", type=int, default=None, help="steps per row instead of a time budget (smoke runs)")
    p.add_argument("--tasks", default="detect,segment")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--workers", type=int, default=1, help="data loader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/dense_transfer"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = args.model
    if args.pretrained_run:  # check it (and learn its model) before any work
        from convnext.train import load_run

        _, run_cfg = load_run(args.pretrained_run)
        run_model = run_cfg["model"]["name"]
        if model and model != run_model:
            raise SystemExit(f"--model {model} but {args.pretrained_run} trained {run_model}: use the same backbone")
        model = run_model
    model = model or "convnext_atto"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"detect", "segment"}
    if unknown:
        raise SystemExit(f"--tasks: unknown {sorted(unknown)}; choose from detect, segment")
    roots = {}
    if "detect" in tasks:
        roots["detect"] = dataset_root(args.data, args.cache, "pennfudan.tar", "PennFudanPed")
    if "segment" in tasks:
        roots["segment"] = dataset_root(args.data, args.cache, "camvid.tar", "CamVid")

    t0 = time.time()
    results = [run_row(task, *row, roots[task], args) for task in tasks for row in rows(model, args.pretrained_run)]
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "budget_min": None if args.max_steps else args.budget_min,
        "max_steps": args.max_steps,
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"env": env, "rows": results}, indent=2) + "\n")
    if args.json:
        print(json.dumps({"env": env, "rows": [{k: v for k, v in r.items() if k != "config"} for r in results]}))
        return 0
    budget = f"{args.max_steps} steps" if args.max_steps else f"{args.budget_min:g} min"
    if "detect" in tasks:
        print(f"\nPenn-Fudan, Mask R-CNN, 50 test images, {budget} of training per row (AP in %)\n")
        print(table(results, "detect", DETECT_COLS))
    if "segment" in tasks:
        print(f"\nCamVid test (233 images), UperNet, {budget} of training per row (in %)\n")
        print(table(results, "segment", SEGMENT_COLS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

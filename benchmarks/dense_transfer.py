"""Transfer to detection and segmentation at one budget: ConvNeXt from scratch, ConvNeXt pre-trained by our own
trainers (`convnext train` or `convnext pretrain` run folders, e.g. supervised on CIFAR-10 or FCMAE on its images),
and torchvision's ResNet-50 (no weights) as the peer.

Every row trains with the same recipe, the same data and the same wall-clock budget on the same machine, then is
scored once: Penn-Fudan (seeded 120 train / 50 test) with Mask R-CNN -> COCO box and mask AP; CamVid (train 367,
scored on test 233 at full label resolution) with UperNet -> mIoU. No ImageNet weights can be downloaded here, so
"pre-trained" means our own small pre-training: expect small numbers, and read the rows against each other.
With `--same-total` the rows cost the same in all: a row's pre-training is counted in core-minutes (its run's
training seconds x threads, down the chain of runs its weights started from), and a row with less of it (scratch:
none) trains on the task for the difference longer, so pre-training has to beat spending its time on the task.

    python benchmarks/dense_transfer.py --data ../shared/data --pretrained-run runs/cifar_atto --budget-min 3
    python benchmarks/dense_transfer.py ... --pretrained-run runs/fcmae --pretrained-run runs/cifar --same-total \
        --threads 1 --no-resnet                   # FCMAE against supervised pre-training against scratch
    python benchmarks/dense_transfer.py ... --json          # one JSON object instead of the tables
    python benchmarks/dense_transfer.py ... --max-steps 2   # smoke run: a couple of steps per row

Rows are run folders under --out; a finished row of the same budget is reused (delete the folder to redo it), so
an interrupted benchmark continues where it stopped. The results, the config of every row and the environment
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


def core_minutes(run: Path) -> float:
    """Core-minutes that went into a run's weights: its training seconds x its threads (this machine's cores if the
    run left torch's default), plus those of the run its weights started from (a fine-tuning run's
    `model.checkpoint` inside another run folder), all the way down."""
    results, config = run / "results.json", run / "config.json"
    if not results.is_file() or not config.is_file():
        raise FileNotFoundError(f"{run}: not a finished run (needs results.json and config.json)")
    cfg = json.loads(config.read_text())
    r = json.loads(results.read_text())
    if "train_s" not in r:
        raise ValueError(f"{results}: no train_s (the run's training seconds)")
    threads = cfg.get("threads")
    if not threads:  # the run took torch's default: one thread per core, on the machine it ran on
        threads = os.cpu_count() or 1
        log.warning("%s: threads not recorded (torch's default); counting this machine's %d cores", config, threads)
    minutes = r["train_s"] / 60 * threads
    start = (cfg.get("model") or {}).get("checkpoint")
    if start and (Path(start).parent / "results.json").is_file():
        minutes += core_minutes(Path(start).parent)
    return minutes


def rows(model: str, runs: list[str], resnet: bool) -> list[tuple[str, str, str | None]]:
    """(row name, backbone model, pretrained run) for each row."""
    out = [(f"{model} from scratch", model, None)]
    out += [(f"{model} pre-trained ({Path(run).name})", model, run) for run in runs]
    if resnet:
        out.append(("ResNet-50 from scratch (torchvision)", "resnet50", None))
    return out


def run_row(
    task: str,
    name: str,
    model: str,
    pretrained: str | None,
    root: Path,
    args: argparse.Namespace,
    extra_min: float,
    pre_core_min: float,
) -> dict:
    """Train and score one row: `args.budget_min` + `extra_min` minutes (or `args.max_steps` steps);
    `pre_core_min`: the core-minutes its starting weights cost (`core_minutes`), for the table."""
    cfg = pennfudan(model) if task == "detect" else camvid(model)
    cfg.backbone.pretrained_run = pretrained
    cfg.data.root = str(root)
    if task == "segment":
        cfg.data.val_split = "test"  # score on CamVid's test split
    r = cfg.run
    r.output = str(args.out / task / name.replace(" (", "_").strip(")").replace(" ", "_").replace("/", "_"))
    r.eval_every, r.threads, r.num_workers, r.seed = 0, args.threads, args.workers, args.seed
    r.epochs = 1000  # the budget ends training, not the epochs
    if args.max_steps:
        r.max_steps, r.budget_min = args.max_steps, None
    else:
        r.budget_min = args.budget_min + extra_min
    results, config = Path(r.output) / "results.json", Path(r.output) / "config.json"
    done = json.loads(config.read_text())["run"] if results.is_file() and config.is_file() else {}
    if done and (done["budget_min"], done["max_steps"]) == (r.budget_min, r.max_steps):
        log.info("%s / %s: reusing %s", task, name, results)
        row = json.loads(results.read_text())
    else:
        if Path(r.output).exists():  # interrupted or of another budget: start again (a budget is spent in one go)
            r.overwrite = True
        log.info(
            "%s / %s: training for %s", task, name, f"{r.max_steps} steps" if r.max_steps else f"{r.budget_min} min"
        )
        row = (train_detection if task == "detect" else train_segmentation)(cfg)
    row["params_m"] = row["params"] / 1e6
    row["images_seen"] = row["steps"] * r.batch_size
    row["pre_core_min"] = pre_core_min
    config = json.loads((Path(r.output) / "config.json").read_text())  # as resolved by the run
    return {"row": name, "task": task, **row, "config": config}


def table(results: list[dict], task: str, cols: tuple[str, ...]) -> str:
    head = ["backbone", "pre-training core-min", "params (M)", "steps", "images seen", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in results if r["task"] == task):
        vals = [f"{100 * r[c]:.1f}" if isinstance(r.get(c), float) and r[c] == r[c] else "-" for c in cols]
        lines.append(
            f"| {r['row']} | {r['pre_core_min']:.0f} | {r['params_m']:.1f} | {r['steps']} | {r['images_seen']} | "
            + " | ".join(vals)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with pennfudan.tar, camvid.tar")
    p.add_argument("--cache", type=Path, default=Path("runs/data"), help="where the tars are extracted")
    p.add_argument(
        "--pretrained-run",
        action="append",
        default=[],
        help="a `convnext train` or `convnext pretrain` run folder (e.g. CIFAR-10); repeat for more rows",
    )
    p.add_argument("--model", default=None, help="backbone (default: the pretrained run's model, else convnext_atto)")
    p.add_argument("--budget-min", type=float, default=3.0, help="training minutes per row")
    p.add_argument(
        "--same-total",
        action="store_true",
        help="every row gets the same core-minutes in all: a row whose weights had less pre-training (scratch: "
        "none) trains for the difference longer (pre-training core-minutes / this benchmark's --threads)",
    )
    p.add_argument("--no-resnet", action="store_true", help="leave out the ResNet-50 row")
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
    pre_min = {}
    for run in args.pretrained_run:  # check each (and learn its model) before any work
        pre_min[run] = core_minutes(Path(run))
        run_model = json.loads((Path(run) / "config.json").read_text())["model"]["name"]
        if model and model != run_model:
            raise SystemExit(f"{run} trained {run_model}, not {model}: every row needs the same backbone")
        model = run_model
    if args.same_total and not args.threads:
        raise SystemExit("--same-total counts core-minutes: give --threads")
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
    longest = max(pre_min.values(), default=0.0)

    def extra(run: str | None) -> float:
        if not args.same_total:
            return 0.0
        return (longest - pre_min.get(run, 0.0)) / args.threads

    results = [
        run_row(task, name, m, run, roots[task], args, extra(run), pre_min.get(run, 0.0))
        for task in tasks
        for name, m, run in rows(model, args.pretrained_run, not args.no_resnet)
    ]
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "budget_min": None if args.max_steps else args.budget_min,
        "same_total": args.same_total,
        "max_steps": args.max_steps,
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"env": env, "rows": results}, indent=2) + "\n")
    if args.json:
        print(json.dumps({"env": env, "rows": [{k: v for k, v in r.items() if k != "config"} for r in results]}))
        return 0
    budget = f"{args.max_steps} steps" if args.max_steps else f"{args.budget_min:g} min"
    if args.same_total and not args.max_steps:
        budget += f" (+ the pre-training core-minutes a row lacks against the longest / {args.threads} threads)"
    if "detect" in tasks:
        print(f"\nPenn-Fudan, Mask R-CNN, 50 test images, {budget} of training per row (AP in %)\n")
        print(table(results, "detect", DETECT_COLS))
    if "segment" in tasks:
        print(f"\nCamVid test (233 images), UperNet, {budget} of training per row (in %)\n")
        print(table(results, "segment", SEGMENT_COLS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

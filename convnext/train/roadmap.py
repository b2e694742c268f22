"""The roadmap trained step by step: every step of ResNet-50 -> ConvNeXt-T with the same data and time budget.

Step 00 trains with the original ResNet recipe, steps 01-12 with the modern one (both below, as TrainConfigs).
Each finished step is written to `OUTPUT/results.json` at once, so an interrupted ladder continues from the
last finished step (an unfinished step restarts: its budget is wall-clock time and cannot be split). The
table goes to `roadmap.md`, `roadmap.csv`, `roadmap.json`, and a figure in the style of the paper's Figure 2
to `roadmap.png`. Step runs live in `OUTPUT/runs/<step>` (checkpoints for `convnext erf --checkpoint`).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from convnext.data.decode import is_image_file
from convnext.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from convnext.flops import count_gmacs, count_params
from convnext.registry import create_model
from convnext.roadmap import PAPER, STEP_CONFIGS
from convnext.train import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, fit

log = logging.getLogger(__name__)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PLANNED_EPOCHS = 200  # an upper bound: the budget ends every run long before (the schedule is fitted to it)


@dataclass(frozen=True)
class LadderConfig:
    data: str  # "cifar10" or an image folder (train/ and val/ or test/ inside, or class folders to split)
    budget_min: float  # training minutes per step (wall clock; evaluation comes after)
    steps: tuple[int, ...] = tuple(range(13))
    output: str = "runs/roadmap"
    data_dir: str | None = None  # cifar10: a folder with cifar10-images/ or cifar10-jpg.tar, else torchvision's
    img_size: int | None = None  # None: 32 for CIFAR; an image folder: its images' size (up to 224)
    patch_size: int | None = None  # stem stride; None: 2 for images up to 64px, 4 otherwise
    batch_size: int = 256
    lr: float | None = None  # peak lr of the modern recipe; None: 2e-3 at batch 256 (small images), else 4e-3 at 4096
    workers: int = 2
    device: str | None = None  # None: cuda when available
    seed: int = 0

    def resolved(self) -> LadderConfig:
        cifar = self.data.lower() == "cifar10"
        img = self.img_size or (32 if cifar else folder_img_size(self.data))
        return replace(self, img_size=img, patch_size=self.patch_size or (2 if img <= 64 else 4))


def folder_img_size(root: str | Path, sample: int = 32, largest: int = 224) -> int:
    """A training size for an image folder: the median shorter side of the first `sample` images, rounded down
    to a multiple of 32 (at least 32, at most `largest`), so 32 px images are not trained at 224. `largest`
    when the folder holds no images (the dataset itself then reports that)."""
    files = (p for p in Path(root).rglob("*") if is_image_file(p))  # lazily: not `find_images`, which lists them all
    sides = []
    for path in itertools.islice(files, sample):  # the first ones found: no listing of a million-image folder
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except OSError:
            continue  # an unreadable file: the dataset names it when it gets there
    if not sides:
        return largest
    return max(32, min(largest, sorted(sides)[len(sides) // 2] // 32 * 32))


# Settings that make two ladders comparable; a results.json made with others is never mixed with this one.
SAME_LADDER = ("data", "budget_min", "img_size", "patch_size", "batch_size", "lr", "seed")


def _data_config(lc: LadderConfig, data: str) -> DataConfig:
    small = lc.img_size <= 64
    return DataConfig(
        name=data,
        data_dir=lc.data_dir,
        img_size=lc.img_size,
        crop_pct=1.0 if small else 0.875,
        mean=CIFAR10_MEAN if lc.data.lower() == "cifar10" else IMAGENET_MEAN,
        std=CIFAR10_STD if lc.data.lower() == "cifar10" else IMAGENET_STD,
        crop="pad" if small else "rrc",  # the crop of each world: pad-and-crop for 32px, RandomResizedCrop for 224
        num_workers=lc.workers,
    )


def original_recipe(lc: LadderConfig, data: str) -> TrainConfig:
    """ResNet's recipe (He et al. 2016): SGD momentum 0.9, lr 0.1 per 256 images, step decay /10 at 1/3 and 2/3
    of the run, weight decay 1e-4, crop and flip only, no label smoothing, no stochastic depth, no EMA."""
    d = _data_config(lc, data)
    d.randaugment, d.re_prob, d.mixup, d.cutmix, d.label_smoothing = False, 0.0, 0.0, 0.0, 0.0
    return TrainConfig(
        model=ModelConfig(patch_size=lc.patch_size, drop_path_rate=0.0),
        data=d,
        optim=OptimConfig(name="sgd", base_lr=0.1, base_batch=256, weight_decay=1e-4, momentum=0.9),
        sched=ScheduleConfig(name="step", warmup_epochs=0, step_epochs=PLANNED_EPOCHS / 3, gamma=0.1),
        epochs=PLANNED_EPOCHS,
        batch_size=lc.batch_size,
        budget_min=lc.budget_min,
        ema=False,
        eval_every=10**6,  # one evaluation, at the end: every step's budget is spent training
        device=lc.device or "auto",
        seed=lc.seed,
    )


def modern_recipe(lc: LadderConfig, data: str) -> TrainConfig:
    """The paper's recipe (its Table 5), scaled down for runs of minutes: AdamW wd 0.05, warmup then cosine,
    RandAugment (2 ops, magnitude 5 instead of 9), Mixup 0.8 / CutMix 1.0 on half the batches, label smoothing
    0.1, stochastic depth 0.05 (ConvNeXt-T: 0.1), layer scale 1e-6, random erasing 0.1 (0.25); no EMA (too short)."""
    d = _data_config(lc, data)
    d.ra_num_ops, d.ra_magnitude, d.re_prob, d.mix_prob, d.label_smoothing = 2, 5.0, 0.1, 0.5, 0.1
    small = lc.img_size <= 64
    base_lr, base_batch = (2e-3, 256) if small else (4e-3, 4096)
    return TrainConfig(
        model=ModelConfig(patch_size=lc.patch_size, drop_path_rate=0.05, layer_scale_init=1e-6),
        data=d,
        optim=OptimConfig(name="adamw", lr=lc.lr, base_lr=base_lr, base_batch=base_batch, weight_decay=0.05),
        sched=ScheduleConfig(name="cosine", warmup_epochs=PLANNED_EPOCHS * 20 / 300, min_lr=1e-6),  # 20 of 300
        epochs=PLANNED_EPOCHS,
        batch_size=lc.batch_size,
        budget_min=lc.budget_min,
        ema=False,
        eval_every=10**6,
        device=lc.device or "auto",
        seed=lc.seed,
    )


def step_config(lc: LadderConfig, step: int, data: str) -> TrainConfig:
    """The TrainConfig of one step: its model, the recipe of its side of step 01, its run folder."""
    name = list(STEP_CONFIGS)[step]
    cfg = original_recipe(lc, data) if step == 0 else modern_recipe(lc, data)
    cfg.model.name = name
    cfg.output = str(Path(lc.output) / "runs" / name)
    return cfg


def resolve_data(lc: LadderConfig) -> str:
    """The `data.name` the trainer reads. For cifar10: `data_dir/cifar10-images` when unpacked there, else
    `data_dir/cifar10-jpg.tar` unpacked once into `OUTPUT/data`, else torchvision's CIFAR-10 in `data_dir`."""
    if lc.data.lower() != "cifar10":
        if not Path(lc.data).is_dir():
            raise FileNotFoundError(f"--data: {lc.data!r} is neither 'cifar10' nor a folder")
        return lc.data
    if lc.data_dir is None:
        return "cifar10"
    src = Path(lc.data_dir).expanduser()
    if (src / "cifar10-images").is_dir():
        return str(src / "cifar10-images")
    tar = src / "cifar10-jpg.tar"
    if not tar.is_file():
        return "cifar10"
    dest = Path(lc.output) / "data"
    done = dest / ".unpacked"
    if not done.exists():
        log.info("unpacking %s into %s", tar, dest)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(tar) as t:
                t.extractall(dest, filter="data")  # "data" refuses absolute paths and links out of dest
        except (tarfile.TarError, EOFError) as e:  # not a tar, cut short, or a member the filter refuses
            why = " ".join(str(e).split())  # tarfile's message spans lines
            raise ValueError(f"{tar}: cannot be unpacked ({why}); it is unpacked again on the next run") from None
        done.touch()
    if not (dest / "cifar10-images").is_dir():
        raise FileNotFoundError(f"{tar} holds no cifar10-images/ folder")
    return str(dest / "cifar10-images")


def load_results(path: Path, lc: LadderConfig) -> dict[str, Any]:
    """The finished steps of a ladder in `path`, checked to be the same ladder as `lc`."""
    if not path.exists():
        return {"ladder": asdict(lc), "steps": {}}
    try:
        results = json.loads(path.read_text())
        saved = results["ladder"]
        results["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a roadmap results file ({e}); choose another --output") from None
    differ = [k for k in SAME_LADDER if saved.get(k) != asdict(lc)[k]]
    if differ:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
        raise ValueError(f"{path} holds a ladder with other settings ({was}); choose another --output")
    return results


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write never loses the finished steps


def step_costs(name: str, img_size: int, **overrides) -> dict[str, float]:
    """Params and GMACs of the model as trained (at the training size) and GMACs of the ImageNet model at 224."""
    with torch.device("meta"):
        trained = create_model(name, **overrides)
        imagenet = create_model(name)
        return {
            "params": count_params(trained),
            "gmacs": round(count_gmacs(trained, img_size), 4),
            "gmacs_224": round(count_gmacs(imagenet, 224), 3),
        }


def run_ladder(lc: LadderConfig) -> list[dict[str, Any]]:
    """Train the chosen steps not yet finished in `lc.output`; write the table and figure; return all rows."""
    lc = lc.resolved()
    if lc.budget_min <= 0:
        raise ValueError(f"--budget-min must be positive, got {lc.budget_min}")
    out = Path(lc.output)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = load_results(results_path, lc)
    data = resolve_data(lc)
    names = list(STEP_CONFIGS)
    for step in lc.steps:
        name = names[step]
        if name in results["steps"]:
            log.info("%s: finished before (top-1 %.2f%%), skipped", name, results["steps"][name]["top1"])
            continue
        cfg = step_config(lc, step, data)
        cfg.overwrite = True  # only an unfinished run of this step can be there: it restarts
        log.info("%s: training for %.2f min (%s recipe)", name, lc.budget_min, "original" if step == 0 else "modern")
        metrics = fit(cfg)
        row = {
            "step": step,
            "name": name,
            **step_costs(name, lc.img_size, **cfg.model.build_kwargs(), num_classes=len(metrics["classes"])),
            "img_per_s": round(metrics["img_per_s"] or 0.0, 1),
            "top1": round(metrics["top1"], 2),
            "top5": round(metrics["top5"], 2),
            "epochs": metrics["epochs"],
            "steps": metrics["steps"],
            "recipe": "original" if step == 0 else "modern",
            "paper_top1": PAPER[name][0],
            "paper_gmacs": PAPER[name][1],
            "run_dir": metrics["run_dir"],
        }
        results["steps"][name] = row
        _write_json(results, results_path)
    rows = [results["steps"][n] for n in names if n in results["steps"]]
    write_table(rows, lc, out)
    return rows


COLUMNS = ("step", "name", "params", "gmacs", "gmacs_224", "img_per_s", "top1", "paper_top1", "paper_gmacs")


def write_table(rows: list[dict[str, Any]], lc: LadderConfig, out: Path) -> None:
    """roadmap.md, roadmap.csv, roadmap.json and roadmap.png in `out`."""
    with open(out / "roadmap.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _write_json({"ladder": asdict(lc), "rows": rows}, out / "roadmap.json")
    head = f"| step | params | GMACs ({lc.img_size}px) | GMACs (224) | train img/s | top-1 | paper top-1 (IN-1k) |"
    lines = [
        f"Roadmap ladder on {lc.data}: {lc.budget_min:g} min of training per step, batch {lc.batch_size}, "
        f"{lc.img_size}px, stem stride {lc.patch_size}.",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['gmacs']:.3f} | {r['gmacs_224']:.2f} | {r['img_per_s']:.0f} "
            f"| {r['top1']:.2f} | {r['paper_top1']:.1f} |"
        )
    (out / "roadmap.md").write_text("\n".join(lines) + "\n")
    if rows:
        plot_ladder(rows, lc, out / "roadmap.png")


def plot_ladder(rows: list[dict[str, Any]], lc: LadderConfig, path: Path) -> Path:
    """The paper's Figure 2 layout: one bar per step, top to bottom, accuracy along x, GMACs written beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['step']:02d} {r['name'].split('_', 2)[2].replace('_', ' ')}" for r in rows]
    y = list(range(len(rows)))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(rows) + 1.6), sharey=True)
    panels = [
        (axes[0], [r["top1"] for r in rows], [r["gmacs"] for r in rows], f"{lc.data}, {lc.budget_min:g} min/step"),
        (axes[1], [r["paper_top1"] for r in rows], [r["paper_gmacs"] for r in rows], "paper, ImageNet-1k (300 ep)"),
    ]
    for ax, acc, gmacs, title in panels:
        lo = min(acc) - max(2.0, 0.3 * (max(acc) - min(acc)))
        colors = ["#9e9e9e" if r["step"] == 0 else "#7aa6c2" if r["step"] < 12 else "#d9822b" for r in rows]
        ax.barh(y, [a - lo for a in acc], left=lo, color=colors, height=0.7)
        for yi, a, g in zip(y, acc, gmacs):
            ax.text(a, yi, f" {a:.1f}   {g:.2f}G", va="center", fontsize=8)
        ax.set_xlim(lo, max(acc) + 0.35 * (max(acc) - lo))
        ax.set_xlabel("top-1 accuracy (%)   [GMACs beside each bar]")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=8)
    fig.suptitle("ResNet-50 -> ConvNeXt-T, one design step at a time", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

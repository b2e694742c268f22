"""The `auto` recipe: a from-scratch training config chosen from what the data and the budget are.

`convnext train --data DIR` with no `--preset` comes here. It looks at the data (number of images and classes,
the source images' size, their channel mean and std) and the budget (`--budget-min`, or `--epochs`), times one
training step of each candidate stem on this machine, and picks (each reason is a line of `cfg.recipe`, logged
when the run starts and saved in config.json):

- the stem stride and, when no `--model` is given, the model's size: the finest patchify stem (a first-stage token
  grid from 16x16 down to 8x8) whose measured speed still buys `MIN_EPOCHS` passes over the data in the budget,
  on convnext_atto where it makes `LARGE_MIN_EPOCHS` passes, else on atto with a quarter of its blocks
  (`QUARTER`); finer grids see more of each image, and at 32 px the 16x16 grid on the smaller model beat
  atto's 8x8 at equal time;
- the crop: pad-and-translate by up to 1/16 of the side when the images are about the training size (CIFAR-like;
  airbench's 2 px at 32 px, +1.2 points over 1/8 on CIFAR-10 at 15 epochs: these short runs underfit), a
  random-resized crop from a 1/0.875 margin when they are larger (photos); horizontal flips and flip-averaged
  evaluation, for padded crops also averaged over 1-pixel translations (6 views: +1.2 points on CIFAR-10,
  benchmarks/NOTES.md);
- the normalisation: the data's own channel mean and std;
- the optimizer: Muon (momentum orthogonalised by Newton-Schulz, with AdamW's lr and weight decay through
  Moonshot's RMS matching) on the blocks' weight matrices and AdamW on the rest (`optim.MuonAdamW`): at equal
  epochs it beat AdamW by 3.3 points on CIFAR-10 (15 epochs) and 3.1 on a photo stand-in (33), for ~20% more
  step time at CIFAR's 2x2 stem on the AMD CPU (benchmarks/NOTES.md), and at equal time 80.7 vs 77.7%;
- the schedule: a short warmup and a straight line to zero at the budget ("Budgeted Training", Li et al.
  2020), lr and batch as measured in benchmarks/NOTES.md; label smoothing 0.1; no EMA (with the lr at zero at
  the end the last weights beat a lagging average);
- the stem initialised to whiten the training images' patches (`whiten.py`, airbench's trick) and layer scale
  starting at 0.1 instead of 1e-6, both for a faster start;
- regularisation scaled to the passes the run will make: none beyond crops and flips for short runs, Mixup/CutMix
  and stochastic depth for long ones (from 25 passes with padded crops, which overfit sooner; from 100 with
  random-resized crops, which regularise already);
- class balance from the training set's class counts: class-balanced sampling from an imbalance of
  `IMBALANCE_FROM`:1 (largest class over smallest), nothing below it (`choose_balance`).

Explicit flags are applied after this and always win.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from convnext.data import build_dataset
from convnext.data.cache import decode_transform, typical_short_side
from convnext.data.datasets import align_classes, set_transform
from convnext.engine.balance import MODES as BALANCE_MODES
from convnext.engine.balance import class_counts, imbalance_ratio, targets_of
from convnext.engine.distributed import resolve_device
from convnext.engine.loop import resolve_amp
from convnext.engine.optim import build_optimizer
from convnext.train.config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

log = logging.getLogger("convnext.train")

MIN_EPOCHS = 10  # the fewest passes over the data a finer stem may leave the budget
# the full model before the quarter one only where it still makes this many passes: at equal time atto lost to the
# quarter model at 10 passes (CIFAR-10 5,000-image subset, 2 min: 53.6 vs 60.9%), 12 (a 10,000-image photo stand-in,
# 5 min: 59.8 vs 68.3) and 22 (the same stand-in at 10 min, Muon: 70.45 vs 72.2)
LARGE_MIN_EPOCHS = 40
DEFAULT_EPOCHS = 30  # without a budget
# the passes from which Mixup/CutMix and drop path are added, by crop. Padded crops of images at the training size
# are mild augmentation, and such runs overfit by ~30 passes: CIFAR-10's 5,000-image subset at 29 passes 64.64 vs
# 63.09, CamVid 64 px patches at 52 passes 92.06/91.67 vs 90.22/88.94 (two seeds). Random-resized crops regularise
# already: on the 10,000-image photo stand-in at 34 passes Mixup/CutMix lost (69.35 vs 71.55). benchmarks/NOTES.md
REGULARISE_FROM = {"pad": 25, "rrc": 100}
MIN_SIZE = 16  # the smallest training size chosen without --img-size
BATCH = 128  # more steps for the same images; 128 beat 256 at equal time (benchmarks/NOTES.md)
# Muon on the blocks' matrices, AdamW on the rest: at equal epochs +3.3 on CIFAR-10 (15) and +3.1 on the photo
# stand-in (33) over AdamW at its best lr (benchmarks/NOTES.md)
OPTIMIZER = "muon"
LR_AT_128 = 7.5e-3  # with Muon; 2.5e-3 / 5e-3 / 7.5e-3: 79.12 / 80.60 / 81.03 on CIFAR-10, - / 70.10 / 70.85 on photos
LAYER_SCALE = 0.1  # the paper's 1e-6 keeps every block an identity for the first hundreds of steps
TRANSLATE_DIV = 16  # padded crops move an image by up to 1/16 of its side (2 px at 32 px, as airbench's short runs)
MAX_GRID = 16  # the finest first-stage token grid a budgeted run considers (ResNet's and airbench's on CIFAR)
# atto with a quarter of its blocks, timm's zepto widths: at 32 px its 2x2 stem (16x16 tokens) trains as fast as
# atto's 4x4 (8x8 tokens) and scored 64.0 vs 61.2% in 3 minutes on CIFAR-10 (benchmarks/NOTES.md)
QUARTER: dict[str, Any] = {"depths": (1, 1, 2, 1), "dims": (32, 64, 128, 256)}
# class imbalance (largest class over smallest) from which the recipe re-balances, and how: on long-tailed CIFAR-10
# (quarter atto, 20 epochs, two seeds) both ways beat plain training in macro-F1 by 5-8 points at 100:1 and 10:1
# (100:1: sampling 22.6, weights 22.0, plain 17.2), but weights lost 2-2.7 points of top-1 at 100:1 and sampling
# never did; on CamVid's 128 px patches as they come (72:1, 4 epochs) sampling 78.4 vs weights 48.8 vs plain 42.4
# (benchmarks/NOTES.md section 7). 10:1 is the smallest ratio measured
IMBALANCE_FROM = 10.0
BALANCE = "sampler"


def data_stats(data: str, data_dir: str | None = None, probes: int = 256) -> dict[str, Any]:
    """Images, classes, the source images' median short side and the channel mean/std of a spread sample."""
    ds, classes = build_dataset(data, "train", None, data_dir=data_dir, skip_bad_images=True)
    val, _ = build_dataset(data, "val", None, data_dir=data_dir, skip_bad_images=True)
    align_classes(val, classes, data)  # a class that only val has is named now, before any step is timed
    side = typical_short_side(ds) or 224
    size = min(side, 64)
    set_transform(ds, decode_transform(size))  # decoded through the transform: a large JPEG at reduced scale
    step = max(len(ds) // probes, 1)
    pixels = []
    for i in range(0, len(ds), step)[:probes]:
        item = ds[i]
        if item is not None:
            pixels.append(item[0].float().div(255).flatten(1))
    x = torch.cat(pixels, 1) if pixels else torch.full((3, 1), 0.5)
    mean = tuple(round(v, 4) for v in x.mean(1).tolist())
    std = tuple(round(max(v, 1e-3), 4) for v in x.std(1).tolist())
    counts = class_counts(targets_of(ds), len(classes))
    return {"n": len(ds), "classes": len(classes), "short_side": side, "mean": mean, "std": std, "counts": counts}


def choose_balance(counts: list[int], given: str | None = None) -> tuple[str, str]:
    """(data.balance, the recipe line) for a training set with these class counts: nothing below
    `IMBALANCE_FROM` (a balanced folder trains exactly as before), else `BALANCE` (benchmarks/NOTES.md)."""
    ratio = imbalance_ratio(counts)
    sizes = f"classes of {min(counts)} to {max(counts)} images (ratio {ratio:.1f}:1)"
    if given not in (None, "auto"):
        return given, f"class balance: {given} (given); {sizes}"
    if ratio < IMBALANCE_FROM:
        return "none", f"class balance: none, {sizes} is under {IMBALANCE_FROM:g}:1"
    how = {"sampler": "class-balanced sampling", "weights": "cross-entropy weighted by inverse class frequency"}
    return BALANCE, f"class balance: {how[BALANCE]}, {sizes} is at least {IMBALANCE_FROM:g}:1"


def images_per_second(
    model_name: str,
    patch: int,
    img_size: int,
    classes: int,
    batch: int = 128,
    at_least: float = 0.0,
    *,
    device: torch.device | None = None,
    **kwargs: Any,
) -> float:
    """Training images/s of `model_name` with a `patch` stem on `device` (default the CPU), as the run trains: on
    the CPU the fast path with its timed 1x1 plan, on a GPU the eager model in channels-last with bf16 autocast
    (`gpu_amp`), both with the recipe's optimizer. The median of 4 steps after an untimed first one; the first timed
    step's rate alone when it is under half of `at_least`."""
    from convnext.registry import create_model

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=classes, patch_size=patch, **kwargs).to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    from convnext.fast import FastConvNeXt, cached_plan, runs_fast

    if device.type == "cpu" and runs_fast(model):  # the plan the run will take (cached: the same one)
        net: torch.nn.Module = FastConvNeXt(model, cached_plan(model, x, torch.float32)[0])
    else:
        net = model.to(memory_format=torch.channels_last)
    amp = gpu_amp(device)
    opt = build_optimizer(model, OPTIMIZER, 1e-3, 0.05)
    y = torch.randint(0, classes, (batch,), device=device)
    rates = []
    for i in range(5):  # the first step builds kernels and plans: not timed
        t = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=amp == "bf16"):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            rates.append(batch / (time.perf_counter() - t))
        if len(rates) == 1 and rates[0] * 2 < at_least:  # far too slow: no need for a median
            return rates[0]
    return sorted(rates)[len(rates) // 2]


def gpu_amp(device: torch.device) -> str:
    """The mixed precision the recipe trains with: bf16 autocast on a GPU that has it (fp16 with a scaler on an older
    one), none on the CPU (where the fast path's float32 kernels train faster than bf16 autocast through aten,
    benchmarks/NOTES.md)."""
    return resolve_amp("auto", device)


def auto_recipe(
    data: str,
    *,
    img_size: int | None = None,
    budget_min: float | None = None,
    epochs: int | None = None,
    model: str | None = None,
    patch_size: int | None = None,
    batch_size: int | None = None,
    data_dir: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    balance: str | None = None,
) -> TrainConfig:
    """A TrainConfig for training `model` (default convnext_atto) from scratch on `data` (see the module doc);
    the stem is timed where the run trains: on `device` (auto: a GPU when there is one), on `threads` threads;
    `balance`: data.balance as given (None: chosen from the class counts)."""
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if budget_min is not None and not budget_min > 0:
        raise ValueError(f"--budget-min must be > 0 minutes, got {budget_min}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"--img-size must be >= 1, got {img_size}")
    if balance not in (None, *BALANCE_MODES):
        raise ValueError(f"data.balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device or "auto", int(os.environ.get("LOCAL_RANK", "0")))
    stats = data_stats(data, data_dir)
    name = model or "convnext_atto"
    why: list[str] = []
    n, side = stats["n"], stats["short_side"]
    size = img_size or min(max(side, MIN_SIZE), 224)  # tiny sources upsampled: 8x8 tokens need 16 px at 2x2
    why.append(f"data: {n} training images, {stats['classes']} classes, source short side {side}px; training at {size}")
    batch = batch_size or min(BATCH, max(n // 8, 8))
    lr = LR_AT_128 * (batch / 128) ** 0.5

    patch, shape, rate, why_patch = _choose_stem(name, model is None, size, n, stats["classes"], batch, budget_min,
                                                 patch_size, dev)  # fmt: skip
    why.append(why_patch)

    # ---- how many passes the run will make, and regularisation for that many
    if budget_min is not None:
        expected = rate * budget_min * 60 / n
        planned = epochs or max(int(expected * 3) + 2, 100)  # a bound only: the budget fits the schedule
    else:
        expected = planned = epochs or DEFAULT_EPOCHS
    photos, crop, regularise, translate = augmentation(side, size, expected, why)
    why.append(
        f"Muon on the blocks' matrices and AdamW on the rest, lr {lr:.3g} at batch {batch}, wd 0.05, warmup 3% of "
        "the steps, then linear to 0; EMA off"
    )
    why.append(f"stem initialised as patch whitening of the training images; layer scale starts at {LAYER_SCALE}")
    balanced, line = choose_balance(stats["counts"], balance)
    why.append(line)
    amp = gpu_amp(dev)
    if dev.type == "cuda":
        why.append(f"on the GPU: channels-last, mixed precision {amp} (speeds above timed there)")

    cfg = TrainConfig(
        model=ModelConfig(
            name=name,
            patch_size=patch,
            drop_path_rate=0.1 if regularise else 0.0,
            layer_scale_init=LAYER_SCALE,
            stem_init="whiten",
            kwargs=dict(shape),
        ),
        data=DataConfig(
            name=data,
            data_dir=data_dir,
            img_size=size,
            crop_pct=0.875 if photos else 1.0,
            mean=stats["mean"],
            std=stats["std"],
            crop=crop,
            scale=(0.35, 1.0),
            translate=translate if crop == "pad" else None,
            hflip=0.5,
            randaugment=False,
            re_prob=0.0,
            mixup=0.8 if regularise else 0.0,
            cutmix=1.0 if regularise else 0.0,
            label_smoothing=0.1,
            num_workers=2,
            tta_flip=True,
            tta_shift=0 if photos else 1,
            balance=balanced,
        ),
        optim=OptimConfig(name=OPTIMIZER, lr=lr, base_lr=LR_AT_128, base_batch=128, weight_decay=0.05),
        sched=ScheduleConfig(name="linear", warmup_epochs=0.03 * planned, min_lr=0.0),
        output="runs/auto",
        epochs=planned,
        batch_size=batch,
        budget_min=budget_min,
        ema=False,
        amp=amp,
        channels_last=dev.type == "cuda",
        device=device or "auto",
        eval_every=max(1, round(expected / 5)),  # about 5 evaluations a run, and always one at the end
        recipe=why,
    )
    return cfg


def _choose_stem(
    name: str,
    sizes_open: bool,
    size: int,
    n: int,
    classes: int,
    batch: int,
    budget_min: float | None,
    patch_size: int | None,
    dev: torch.device,
) -> tuple[int, dict[str, Any], float | None, str]:
    """(stem patch, model shape overrides, measured img/s, the recipe line): the finest token grid up to 16x16 that
    the budget affords MIN_EPOCHS with, the full model before the quarter-size one at each grid (`sizes_open`: no
    --model was given, so the recipe may pick the quarter-size model)."""
    candidates = [p for p in (2, 4, 8, 16) if size // p >= 8] or [max(size // 8, 1)]
    shapes = [(name, {})] + ([(f"{name} at a quarter of its blocks", QUARTER)] if sizes_open else [])
    shape, rate = {}, None
    if patch_size is not None and budget_min is None:
        patch, why_patch = patch_size, f"stem {patch_size}x{patch_size} (given)"
    elif budget_min is None:
        patch = next((p for p in candidates if p >= 4), candidates[-1])
        why_patch = f"stem {patch}x{patch}: the paper's 4x4 stem where the image allows an 8x8 token grid (no budget)"
    else:

        def bar(kw: dict[str, Any]) -> int:  # the passes a shape must make: more for the full model of two
            return LARGE_MIN_EPOCHS if len(shapes) > 1 and not kw else MIN_EPOCHS

        grids = [patch_size] if patch_size is not None else [p for p in candidates if size // p <= MAX_GRID]
        order = [(p, label, kw) for p in grids or candidates[-1:] for label, kw in shapes]  # finest grid first
        tried = []
        for p, label, kw in order:
            need = bar(kw) * n / (budget_min * 60)  # images/s
            r = images_per_second(name, p, size, classes, min(batch, 128), at_least=need, device=dev, **kw)
            tried.append((p, label, kw, r))
            if r >= need:
                break
        # the first that affords its bar, else the finest grid on the smallest model (a finer grid beat more passes)
        affordable = tried[-1][3] * budget_min * 60 / n >= bar(tried[-1][2])
        patch, label, shape, rate = tried[-1] if affordable else tried[len(shapes) - 1]
        measured = ", ".join(f"{p}x{p} {lab} {r:.0f} img/s = {r * budget_min * 60 / n:.1f} epochs"
                             for p, lab, _, r in tried)  # fmt: skip
        sizes = f"the larger model where it buys >= {LARGE_MIN_EPOCHS} epochs, else the smaller"
        if patch_size is not None:
            rule = f"the given stem; {sizes}" if len(shapes) > 1 else "the given model and stem"
        else:
            rule = f"the finest grid up to {MAX_GRID}x{MAX_GRID} that buys >= {MIN_EPOCHS} epochs in the budget" + (
                f"; at each grid {sizes}; else the finest grid on the smaller model" if len(shapes) > 1 else ""
            )
        why_patch = f"model {label}, stem {patch}x{patch} ({size // patch}x{size // patch} tokens): {rule} ({measured})"
    return patch, shape, rate, why_patch


def augmentation(side: int, size: int, expected: float, why: list[str]) -> tuple[bool, str, bool, int]:
    """(photos: the images are larger than the training size, crop kind, regularise, translate px) for a run that
    makes `expected` passes; the recipe lines go to `why`."""
    photos = side >= size * 1.25
    crop = "rrc" if photos else "pad"
    regularise = expected >= REGULARISE_FROM[crop]
    translate = max(size // TRANSLATE_DIV, 1)
    why.append(
        "crop: random-resized (area 35-100%) from a margin, as the images are larger than the training size"
        if photos
        else f"crop: reflect-pad by {translate}px (1/16 of the side) and a random crop, as the images are about the "
        "training size; evaluation averages 6 views (flips x 1-pixel translations)"
    )
    why.append(
        f"Mixup 0.8 / CutMix 1.0 and drop path 0.1: the run makes >= {REGULARISE_FROM[crop]} passes with {crop} crops"
        if regularise
        else f"no Mixup/CutMix, RandAugment or drop path: under {REGULARISE_FROM[crop]} passes with {crop} crops, too "
        "few for them to pay back"
    )
    return photos, crop, regularise, translate

"""The automatic recipe when a run starts from weights: `convnext train --data DIR --model SOURCE` (a published tag,
`--pretrained`, a weight file, a Hub repo, a pretrained folder, a training or pre-training run) with no `--preset`.

It looks at the data as the from-scratch recipe does (`auto.data_stats`) and at the weights (`start.Start`: their
architecture, resolution, normalisation, head) and picks, each reason a `recipe:` line:

- the weights' own architecture, stem and layer scale (nothing re-initialised but a head of another size, which
  starts at 0.001 of its usual scale, as the paper fine-tunes), their mean/std and interpolation, no stem whitening;
- the resolution: the data's own (at most 224) where it is larger than the weights' and the budget affords
  `UP_EPOCHS` passes at it; else the weights' own where the budget affords `MIN_EPOCHS` passes at it (both timed on
  this machine, as the from-scratch recipe times its stems), else the data's own size (never under the weights' total
  stride);
- AdamW, by what the weights are (`LR_AT_128`, `LAYER_DECAY`): a supervised model whose head is kept (it already
  solves this task: lr 1e-4, layer-wise decay 0.75), one whose head is new (another task: lr 5e-4, no layer-wise
  decay), or an FCMAE pre-training encoder (features learnt without labels: lr 1e-3, layer-wise decay 0.9), at batch 128
  (square-root scaled), weight decay 0.05, a warmup of `WARMUP_SHARE` of the steps and a cosine to 1e-6; label
  smoothing 0.1;
- crops, flips, Mixup/CutMix and drop path by the passes the run makes, as from scratch (`auto.augmentation`).

These are the field's fine-tuning defaults (the official fine-tuning configs, timm's); which of them win on these
machines is `benchmarks/finetune.py`'s to measure. Explicit flags are applied after this and always win.
"""

from __future__ import annotations

import logging
from typing import Any

from convnext.config import apply_overrides
from convnext.engine.distributed import resolve_device
from convnext.train.auto import BATCH, augmentation, data_stats, gpu_amp, images_per_second
from convnext.train.config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from convnext.train.start import Start, starting_weights
from convnext.weights import resolve_spec

log = logging.getLogger("convnext.train")

MIN_EPOCHS = 5  # the fewest passes the weights' own resolution may leave the budget
# the fewest passes at the data's own size, where it is larger than the weights', for it to be chosen over theirs.
# Fixed-epoch A/B from the 3-minute CIFAR-10 run (64 px weights), epochs scaled by convnext/flops.py's GMACs (124 px
# costs 3.13x 64 px, 128 px 4x), seeds 0/1: Penn-Fudan crops (124 px) at the idle 1.5-minute row's compute, 57 passes
# at 64 px 90.54 / 90.09 vs 18 at 124 px 94.59 / 94.14 (from scratch 89.64 / 89.64); at 0.55 of it, 31 at 64 px
# 89.64 / 88.29 vs 10 at 124 px 91.44 / 92.34; CamVid 128 px patches at its row's compute, 11 at 64 px 86.46 vs 3 at
# 128 px 83.88 (seed 0): too few passes to adapt (benchmarks/NOTES.md)
UP_EPOCHS = 10
# AdamW at batch 128 (square-root scaled with the batch) and layer-wise lr decay, by whether the weights' head is
# kept (they already solve this task) or new (another task). Kept: one epoch on digits from a 6-epoch run there
# (93.06%): lr 1e-4 92.78, 5e-4 91.94 (layer decay 0.75). New: CamVid 64 px patches from a 3-minute CIFAR-10 run,
# 1.5 min (scratch recipe 81.33): lr 1e-4 with layer decay 0.75 68.61, without 75.72; 5e-4 without 87.94, 1e-3
# without 88.61 (one seed each; benchmarks/NOTES.md)
# FCMAE encoder (`Start.fcmae`), ConvNeXt V2's way (a higher lr, layer-wise decay): from a 3-minute CIFAR-10 FCMAE run
# at fixed epochs, CamVid 128 px patches (4) / Penn-Fudan crops (19), mean of seeds 0 and 1: lr 1e-3 with decay 0.9
# 72.85 / 83.78; lr 2e-3 with 0.8 70.45 / 84.46; lr 5e-4 without (a new head's) 69.20 / 83.78; the old --pretrained-run
# route (from-scratch recipe, decay 0.7) 61.82 / 81.08 (seed 0). The from-scratch recipe beat all: 77.30 / 87.17 (a
# weak source; benchmarks/NOTES.md section 9)
LR_AT_128 = {"kept": 1e-4, "new": 5e-4, "fcmae": 1e-3}
LAYER_DECAY = {"kept": 0.75, "new": None, "fcmae": 0.9}
BECAUSE = {
    "kept": "the head is kept (the weights already solve this task)",
    "new": "the head is new (supervised weights from another task)",
    "fcmae": "the weights are an FCMAE encoder (features learnt without labels, no head)",
}
WARMUP_SHARE = 0.05
DEFAULT_EPOCHS = 30  # without a budget
# the published ImageNet-1k weights `--pretrained` picks from when no --model is given, smallest first
PUBLISHED = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny")


def finetune_recipe(
    data: str,
    start: Start | None,
    *,
    img_size: int | None = None,
    budget_min: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    data_dir: str | None = None,
    device: str | None = None,
) -> TrainConfig:
    """A TrainConfig that fine-tunes `start` on `data` (see the module doc); `start` None (`--pretrained` with no
    `--model`): the published weights `choose_published` picks for this data and budget."""
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if budget_min is not None and not budget_min > 0:
        raise ValueError(f"--budget-min must be > 0 minutes, got {budget_min}")
    dev = resolve_device(device or "auto")
    stats = data_stats(data, data_dir)
    n, side, classes = stats["n"], stats["short_side"], stats["classes"]
    batch = batch_size or min(BATCH, max(n // 8, 8))
    chosen = None
    if start is None:
        name, chosen = choose_published(n, classes, batch, budget_min, dev)
        start = starting_weights(name, pretrained=True)
    head = "its head kept" if start.classes == classes else (
        f"a new {classes}-class head at 0.001 of its usual scale" + (
            f" (the weights' {start.classes}-class head dropped)" if start.classes else ""))  # fmt: skip
    trained_at = f" (trained at {start.img_size}px)" if start.img_size else ""
    norm = "its mean/std" if "data.mean" in start.overrides else "the data's mean/std (the file does not say its)"
    why = [
        f"data: {n} training images, {classes} classes, source short side {side}px",
        f"model: fine-tuning {start.arch} from {start.what}{trained_at}; {head}; {norm}; its stem and layer scale; "
        "no stem whitening",
    ] + ([chosen] if chosen else [])
    size, rate = img_size, None
    if size is None:
        size, rate, line = _resolution(start, side, n, classes, batch, budget_min, dev)
        why.append(line)
    if budget_min is not None:
        rate = rate or images_per_second(start.arch, start.patch_size, size, classes, min(batch, 128), device=dev,
                                         **_shape(start))  # fmt: skip
        expected = rate * budget_min * 60 / n
        planned = epochs or max(int(expected * 3) + 2, 30)  # a bound only: the budget fits the schedule
    else:
        expected = planned = epochs or DEFAULT_EPOCHS
    photos, crop, regularise, translate = augmentation(side, size, expected, why)
    kind = "fcmae" if start.fcmae else "kept" if start.classes == classes else "new"
    lr, decay = LR_AT_128[kind] * (batch / 128) ** 0.5, LAYER_DECAY[kind]
    layers = f"layer-wise decay {decay} (the head at the full lr)" if decay else "no layer-wise decay"
    why.append(
        f"AdamW, lr {lr:.3g} at batch {batch} with {layers}, as {BECAUSE[kind]} (measured, benchmarks/NOTES.md); "
        f"wd 0.05, warmup {WARMUP_SHARE:.0%} of the steps then cosine to 1e-6; label smoothing 0.1; EMA off"
    )
    amp = gpu_amp(dev)
    cfg = TrainConfig(
        model=ModelConfig(name=start.arch, drop_path_rate=0.1 if regularise else 0.0, head_init_scale=0.001),
        data=DataConfig(
            name=data, data_dir=data_dir, img_size=size, mean=stats["mean"], std=stats["std"],
            crop_pct=0.875 if photos else 1.0, crop=crop, scale=(0.35, 1.0),
            translate=translate if crop == "pad" else None, hflip=0.5, randaugment=False, re_prob=0.0,
            mixup=0.8 if regularise else 0.0, cutmix=1.0 if regularise else 0.0, label_smoothing=0.1,
            num_workers=2, tta_flip=True, tta_shift=0 if photos else 1,
        ),
        optim=OptimConfig(name="adamw", lr=lr, base_lr=LR_AT_128[kind], base_batch=128, weight_decay=0.05,
                          layer_decay=decay),
        sched=ScheduleConfig(name="cosine", warmup_epochs=WARMUP_SHARE * planned, min_lr=1e-6),
        output="runs/finetune", epochs=planned, batch_size=batch, budget_min=budget_min, ema=False, amp=amp,
        channels_last=dev.type == "cuda", device=device or "auto", eval_every=max(1, round(expected / 5)), recipe=why,
    )  # fmt: skip
    return apply_overrides(cfg, start.overrides)


def _resolution(
    start: Start, side: int, n: int, classes: int, batch: int, budget_min: float | None, dev: Any
) -> tuple[int, float | None, str]:
    """(training size, its measured img/s or None, the recipe line): the data's own size (at most 224) where it is
    larger than the weights' resolution and the budget affords `UP_EPOCHS` passes at it (no budget: always); else the
    weights' own resolution where the budget affords `MIN_EPOCHS` passes at it, else the data's own size (at least the
    weights' total stride); a bare weight file, which does not say its resolution, trains at the data's own size."""
    floor = start.stride
    data_size = max(min(side, 224), floor)
    if start.img_size is None:
        return data_size, None, f"size {data_size}px, the data's own (a weight file does not say its resolution)"
    own = start.img_size
    larger = ""
    if data_size > own:  # the images hold more detail than the weights were trained at
        if budget_min is None:
            return data_size, None, f"size {data_size}px, the data's own: larger than the weights' {own}px"
        need = UP_EPOCHS * n / (budget_min * 60)
        rate = images_per_second(start.arch, start.patch_size, data_size, classes, min(batch, 128), at_least=need,
                                 device=dev, **_shape(start))  # fmt: skip
        passes = rate * budget_min * 60 / n
        if rate >= need:
            return data_size, rate, (f"size {data_size}px, the data's own, larger than the weights' {own}px: "
                                     f"{rate:.0f} img/s buys {passes:.1f} passes (>= {UP_EPOCHS}, where the data's "
                                     "size beat the weights' at equal compute, benchmarks/NOTES.md)")  # fmt: skip
        larger = f" (the data's {data_size}px buys {passes:.1f} passes, under {UP_EPOCHS})"
    native = max(min(side, own), floor)
    if budget_min is None or native == own:
        return own, None, f"size {own}px: the weights' own resolution{larger}"
    need = MIN_EPOCHS * n / (budget_min * 60)
    rate = images_per_second(start.arch, start.patch_size, own, classes, min(batch, 128), at_least=need, device=dev,
                             **_shape(start))  # fmt: skip
    passes = rate * budget_min * 60 / n
    if rate >= need:
        return own, rate, f"size {own}px, the weights' own: {rate:.0f} img/s buys {passes:.1f} passes in the budget"
    return native, None, (f"size {native}px, the data's own: at the weights' {own}px, {rate:.0f} img/s buys "
                          f"{passes:.1f} passes, under {MIN_EPOCHS}")  # fmt: skip


def _shape(start: Start) -> dict[str, Any]:
    return dict(start.overrides.get("model.kwargs") or {})


def choose_published(n: int, classes: int, batch: int, budget_min: float | None, dev: Any) -> tuple[str, str]:
    """(registered name, the recipe line): the largest of `PUBLISHED` whose default weights the budget trains for
    `MIN_EPOCHS` passes at their own resolution (timed here, smallest first, stopping at the first that falls
    short), else the smallest; with no budget the smallest on a CPU and convnext_tiny on a GPU."""
    if budget_min is None:
        name = PUBLISHED[0] if dev.type == "cpu" else "convnext_tiny"
        return (
            name,
            f"weights: {resolve_spec(name, None).name}, {'the smallest' if dev.type == 'cpu' else 'tiny'} "
            f"published ImageNet weights (no budget to time the others against; --model picks any of {PUBLISHED})",
        )
    need = MIN_EPOCHS * n / (budget_min * 60)
    measured, name = [], PUBLISHED[0]
    for arch in PUBLISHED:
        size = resolve_spec(arch, None).input_size
        rate = images_per_second(arch, 4, size, classes, min(batch, 128), at_least=need, device=dev)
        measured.append(f"{arch} {rate * budget_min * 60 / n:.1f}")
        if rate < need:
            break
        name = arch
    spec = resolve_spec(name, None)
    return name, (f"weights: {spec.name}, the largest published weights the budget trains for >= {MIN_EPOCHS} "
                  f"passes at {spec.input_size}px (passes: {', '.join(measured)})")  # fmt: skip

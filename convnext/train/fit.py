"""`fit(cfg)`: train (or fine-tune, or resume) one classification run end to end on the run engine
(`convnext.engine.trainer`): this module builds the data, the model and the loaders, and gives the engine the
classification task (cross-entropy after Mixup/CutMix, top-1/top-5 of the model and its EMA, curves.png).

Everything that can be checked is checked before the first step: the run folder, the data (empty, class mismatch
between train and val, batch larger than the dataset), and the weights to resume from or start from.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from convnext.data import SeededDataset, build_dataset, collate_skip, eval_transform, train_transform
from convnext.data.cache import (
    BatchAugment,
    CachedImages,
    CachedLoader,
    cache_size,
    decode_all,
    decode_transform,
    fits_in_memory,
    memory_available,
    typical_short_side,
)
from convnext.data.datasets import align_classes, set_transform
from convnext.engine.balance import MODES as BALANCE_MODES
from convnext.engine.balance import BalancedSampler, class_counts, class_weights, imbalance_ratio, targets_of
from convnext.engine.distributed import (
    DistInfo,
    ResumableSampler,
    ShardSampler,
    broadcast_object,
    check_same,
    check_shard,
    data_digest,
    joined,
    per_rank_batch,
    shard,
    wrap,
)
from convnext.engine.ema import build_ema
from convnext.engine.loop import cuda_switches, resolve_amp
from convnext.engine.optim import build_optimizer, scaled_lr
from convnext.engine.report import TRACKERS, Trackers
from convnext.engine.run import RunFolder
from convnext.engine.trainer import Loop, LrShape, Trainer, restore_weights, schedule
from convnext.extras import require
from convnext.fast import FastConvNeXt, cached_plan, keep_freed_memory, kernels, plan_from_rows, plan_to_rows, runs_fast
from convnext.fast import usable as fast_usable
from convnext.flops import activation_memory
from convnext.model import ConvNeXt
from convnext.registry import split_name
from convnext.train.auto import choose_balance
from convnext.train.config import TrainConfig, resolve_preprocessing
from convnext.train.runs import build_model
from convnext.train.task import SELECT, ClassificationTask
from convnext.train.whiten import whiten_stem

log = logging.getLogger("convnext.train")


def fit(cfg: TrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Train `cfg` (one process, or one rank of a torchrun job) and return the final metrics:
    {"top1", "top5", "loss", "n", "ema_top1"..., "best_top1", "epochs", "steps", "img_per_s", "run_dir", ...}.

    The run folder (`cfg.output`, or `cfg.resume` to continue a run) gets config.json, metrics.csv/.jsonl,
    curves.png, last.pt, best.pt and results.json.

    model: train this module (e.g. a timm or torchvision network, for comparisons) instead of building
        `cfg.model`; it must output `len(classes)` logits. `convnext.resolve` cannot rebuild such a run.
    """
    cfg = copy.deepcopy(cfg)  # the run resolves fields (lr, classes); the caller's config stays as given
    with joined(cfg.device) as info, contextlib.ExitStack() as held:  # the lock is held until the run ends
        return _fit(cfg, info, model, held)


def _fit(cfg: TrainConfig, info: DistInfo, module: nn.Module | None, held: contextlib.ExitStack) -> dict[str, Any]:
    t_setup = time.perf_counter()
    if not info.is_main:
        log.setLevel(logging.WARNING)
    if cfg.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    _check_config(cfg)
    if cfg.shard:
        check_shard(cfg.model.name, info)
    cfg.amp = resolve_amp(cfg.amp, info.device)
    if switches := cuda_switches(info.device):
        cfg.recipe.append(f"on the GPU: autocast {cfg.amp}, " + ", ".join(k for k, on in switches.items() if on))
    if split_name(cfg.model.name)[1] and not (cfg.model.checkpoint or cfg.model.pretrained or cfg.resume):
        cfg.model.pretrained = True  # a tag means its weights, as in eval and predict
        cfg.recipe.append(f"model: {cfg.model.name} names published weights: the run starts from them")
    cfg.recipe += resolve_preprocessing(cfg)  # mean, std and eval resize of the weights the run starts from
    run = RunFolder(cfg.resume or cfg.output, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    cfg.output, cfg.resume = str(run.path), cfg.resume if run.resume else None  # stopped before a checkpoint: anew
    for line in cfg.recipe:
        log.info("recipe: %s", line)
    data = _data(cfg, info)
    check_same("training data (file names, sizes and labels)", lambda: data_digest(data.train), info,
               "give every process the same --data (on every machine)")  # fmt: skip
    weights = _balance(cfg, data)
    per_rank = per_rank_batch(cfg.batch_size, cfg.accum_steps, info, len(data.train))

    # ---- model, EMA, optimizer (same init on every rank; then per-rank randomness)
    torch.manual_seed(cfg.seed)
    model = module if module is not None else build_model(cfg.model, len(data.classes), init_weights=not cfg.resume)
    if cfg.model.stem_init not in ("default", "whiten"):
        raise ValueError(f"model.stem_init must be default or whiten, not {cfg.model.stem_init!r}")
    if isinstance(model, ConvNeXt):
        _check_size(model, cfg.data.img_size, per_rank, info)
    data.decode(cfg)
    fresh = module is None and not (cfg.resume or cfg.model.pretrained or cfg.model.checkpoint)
    if cfg.model.stem_init == "whiten" and fresh:
        images = data.train_cache.images if data.train_cache is not None else _sample_images(cfg)
        whiten_stem(model.stem[0], images, cfg.data.mean, cfg.data.std, seed=cfg.seed)
    state = run.load_last() if cfg.resume else None
    if state is not None:
        restore_weights(model, state, str(run.last))
    torch.manual_seed(cfg.seed + info.rank)
    model.to(info.device)
    if cfg.channels_last and not cfg.shard:  # FSDP takes contiguous parameters only; the inputs go channels-last
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    ema = build_ema(model, cfg.ema_decay) if cfg.ema else None
    if cfg.shard:  # each block's weights, gradients and AdamW state split over the processes; the EMA likewise
        shard(model, info)
        if ema is not None:
            shard(ema.module, info)
        log.info("sharded (FSDP) over %d processes: each holds 1/%d of the weights, gradients, optimizer state and "
                 "EMA", info.world_size, info.world_size)  # fmt: skip
    o = cfg.optim
    o.lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, cfg.batch_size, o.base_batch)  # saved resolved
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, layer_decay=o.layer_decay, betas=o.betas,
                                eps=o.eps, momentum=o.momentum, nesterov=o.nesterov)  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    train_loader, val_loader, sampler = _loaders(cfg, info, data, per_rank)
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} with accum_steps {cfg.accum_steps} leaves no full step an epoch")
    forward, plan, fast_path = _fast_path(cfg, info, model, per_rank, state)
    shared = f"a resumed run reads it from {run.last}: put the run folder on a filesystem every machine shares"
    check_same("1x1 plan of the fast path", lambda: plan_to_rows(plan) if plan else None, info, shared)
    forward = forward if cfg.shard else wrap(forward, info)
    if cfg.compile:
        forward = torch.compile(forward)

    loop = Loop(cfg.epochs, steps_per_epoch, per_rank, cfg.accum_steps, o.clip_grad, cfg.budget_min,
                cfg.ckpt_every_steps, cfg.eval_every, tensorboard=cfg.tensorboard,
                early_stop=cfg.early_stop)  # fmt: skip
    if cfg.early_stop and cfg.budget_min is not None:
        log.info("early stopping does not apply to budgeted runs: the run keeps the schedule fitted to its budget")
    s = cfg.sched
    sched = schedule(loop, round(s.warmup_epochs * steps_per_epoch), round(s.step_epochs * steps_per_epoch))
    trackers = Trackers(cfg.trackers, run.path, cfg.to_dict(), resume=bool(cfg.resume)) if info.is_main else None
    task = ClassificationTask(cfg, info, val_loader, len(data.classes), run.path, class_weights=weights,
                              trackers=trackers if cfg.trackers else None)  # fmt: skip
    trainer = Trainer(
        task, run, model=model, optimizer=optimizer, loader=train_loader, sampler=sampler, info=info, loop=loop,
        lr=LrShape(o.lr, s.name, s.min_lr, s.warmup_lr, s.gamma), sched=sched, config=cfg.to_dict(),
        forward=forward, ema=ema, scaler=scaler, state=state, extra={"plan": plan_to_rows(plan) if plan else None},
        skipped_at_setup=data.train_cache.skipped if data.train_cache is not None else 0,
    )  # fmt: skip
    log.info(
        "training %s on %s (%d train / %d val images, %d classes) for %d epochs x %d steps, batch %d "
        "(%d per process x %d processes x %d accumulation), lr %.3g, %s",
        cfg.model.name + (f" {cfg.model.kwargs}" if cfg.model.kwargs else ""), cfg.data.name, len(data.train),
        len(data.val), len(data.classes), cfg.epochs, steps_per_epoch, cfg.batch_size, per_rank, info.world_size,
        cfg.accum_steps, o.lr, info.device,
    )  # fmt: skip
    if state is not None and trainer.early_stopped():
        log.info("the run stopped early at epoch %d (no better %s for %d evaluated epochs): nothing left to train; "
                 "--early_stop 0 goes on", trainer.epoch, cfg.select, trainer.stale)  # fmt: skip
    try:
        out = trainer.fit(held)
    except BaseException:
        if task.trackers is not None:
            task.trackers.finish(None, failed=True)
        raise
    row = out["row"]
    result = {
        "top1": row["val_top1"],
        "top5": row["val_top5"],
        "loss": row["val_loss"],
        "n": row.get("val_n"),
        "macro_f1": row.get("val_macro_f1"),  # in %, as top-1
        "balanced_accuracy": row.get("val_balanced_accuracy"),
        "classes": list(data.classes),
        **{k: row[k] for k in ("ema_top1", "ema_top5", "ema_loss") if k in row},
        **({"best_top1": max(trainer.best, row["val_top1"])} if cfg.select == "top1" else {}),
        "select": cfg.select,  # the metric that picked best.pt, and its best value
        f"best_{cfg.select}": _best(trainer.best, row, cfg.select),
        # stopped before the schedule's end by --early-stop: after which epoch, and why
        "early_stop": {"after_epoch": trainer.epoch, "patience": cfg.early_stop, "metric": cfg.select}
        if trainer.early_stopped()
        else None,
        "train_loss": row.get("train_loss"),
        "img_per_s": out["images"] / out["train_time"] if out["train_time"] else None,  # training, all processes
        "epochs": out["epochs"],
        "steps": out["steps"],
        "time_s": time.perf_counter() - out["t0"],
        "train_s": out["train_s"],  # what the budget counts
        "setup_s": out["t0"] - t_setup,  # data scan and decoding, model, plan: before the budget's clock starts
        # what the CPU fast path ran on: the C kernels, or aten's where they could not be built (said once)
        "fast_path": fast_path,
        "c_kernels": kernels.status() if fast_path == "on" else "not used",
        "run_dir": str(run.path),
    }
    if info.is_main:
        run.write_json("results.json", result)
    if task.trackers is not None:
        files = [run.path / f for f in ("results.json", "config.json", "metrics.csv", "curves.png")]
        task.trackers.finish(result, files)
    return result


def _best(best: float, row: dict[str, Any], select: str) -> float:
    """The best value of the selected metric over the run, counting the final evaluation (losses were negated)."""
    key, larger = SELECT[select]
    final = row.get(key, math.nan)
    if larger:
        return max(best, final)
    return min(-best, final) if math.isfinite(best) else final


def _balance(cfg: TrainConfig, data: _Data) -> torch.Tensor | None:
    """Resolve `data.balance` (auto: `train.auto.choose_balance` on the training set's class counts, said in a
    recipe line) and return the cross-entropy's class weights for `weights` (None otherwise)."""
    d = cfg.data
    if d.balance == "none":
        return None
    counts = class_counts(targets_of(data.train), len(data.classes))
    if d.balance == "auto":
        d.balance, line = choose_balance(counts)
        cfg.recipe.append(line)
        log.info("recipe: %s", line)
    how = {"weights": "cross-entropy weighted by inverse class frequency", "sampler": "class-balanced sampling"}
    if d.balance in how:
        log.info("data: %s (classes of %d to %d images, ratio %.1f:1)", how[d.balance], min(counts), max(counts),
                 imbalance_ratio(counts))  # fmt: skip
    return class_weights(counts) if d.balance == "weights" else None


class _Data:
    """The run's datasets and classes, and the in-memory cache when the images are decoded once."""

    def __init__(self, train: Any, val: Any, classes: list[str], cache: int | None):
        self.train, self.val, self.classes, self.cache = train, val, classes, cache
        self.train_cache: CachedImages | None = None
        self.val_cache: CachedImages | None = None

    def decode(self, cfg: TrainConfig) -> None:
        if self.cache is None:
            return
        d, t = cfg.data, time.perf_counter()
        self.train_cache = decode_all(self.train, self.cache, workers=d.num_workers)
        self.val_cache = decode_all(self.val, d.img_size, workers=d.num_workers)
        bad = self.train_cache.skipped + self.val_cache.skipped
        log.info(
            "decoded %d train images at %dx%d and %d val images at %dx%d into memory in %.1fs%s",
            len(self.train_cache), self.cache, self.cache, len(self.val_cache), d.img_size, d.img_size,
            time.perf_counter() - t, f"; skipped {bad} unreadable" if bad else "",
        )  # fmt: skip


def _data(cfg: TrainConfig, info: DistInfo) -> _Data:
    """Datasets and classes, every check before any work; the transforms of the per-image path, or the cache's."""
    d = cfg.data
    common = dict(data_dir=d.data_dir, val_split=d.val_split, skip_bad_images=d.skip_bad_images, download=d.download)
    train_ds, classes = build_dataset(d.name, "train", None, **common)
    val_ds, _ = build_dataset(d.name, "val", None, **common)
    if note := align_classes(val_ds, classes, d.name):
        log.info(note)
    if d.classes and d.classes != classes:
        raise ValueError(f"the run was made for classes {d.classes[:5]}..., the data has {classes[:5]}...")
    d.classes = classes
    cache = _cache_plan(cfg, train_ds, val_ds, info)
    if cache is None:
        set_transform(train_ds, train_transform(
            d.img_size, crop=d.crop, scale=d.scale, hflip=d.hflip, translate=d.translate, randaugment=d.randaugment,
            ra_num_ops=d.ra_num_ops, ra_magnitude=d.ra_magnitude, ra_magnitude_std=d.ra_magnitude_std,
            re_prob=d.re_prob, mean=d.mean, std=d.std,
        ))  # fmt: skip
        set_transform(val_ds, eval_transform(d.img_size, d.crop_pct, d.mean, d.std, d.interpolation))
    return _Data(train_ds, val_ds, classes, cache)


def _loaders(cfg: TrainConfig, info: DistInfo, data: _Data, per_rank: int) -> tuple[Any, Any, ResumableSampler]:
    """(train loader, val loader, train sampler): batches cut from the cache, or a DataLoader over the images."""
    d = cfg.data
    balanced = d.balance == "sampler"
    if data.train_cache is not None:
        sampler: Any = ResumableSampler(data.train_cache, info, cfg.seed, shuffle=True, drop_last=True)
        if balanced:
            sampler = BalancedSampler(data.train_cache.targets.tolist(), len(data.classes), info, cfg.seed)
        augment = BatchAugment(
            d.img_size, crop=d.crop, scale=d.scale, hflip=d.hflip, translate=d.translate, mean=d.mean, std=d.std
        )
        train: Any = CachedLoader(data.train_cache, sampler, per_rank, augment=augment, drop_last=True, seed=cfg.seed,
                                  rank=info.rank, world=info.world_size)  # fmt: skip
        val: Any = CachedLoader(
            data.val_cache, ShardSampler(len(data.val_cache), info), max(per_rank, 64), normalise=(d.mean, d.std)
        )
        return train, val, sampler
    train_set = SeededDataset(data.train, cfg.seed)
    sampler = ResumableSampler(train_set, info, cfg.seed, shuffle=True, drop_last=True)
    if balanced:
        sampler = BalancedSampler(targets_of(data.train), len(data.classes), info, cfg.seed)
    args = dict(num_workers=d.num_workers, pin_memory=d.pin_memory and info.device.type == "cuda",
                collate_fn=collate_skip)  # fmt: skip
    train = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True, generator=torch.Generator(),
                       **args)  # fmt: skip
    val = DataLoader(data.val, batch_size=max(per_rank, 64), sampler=ShardSampler(len(data.val), info), **args)
    return train, val, sampler


def _fast_path(
    cfg: TrainConfig, info: DistInfo, model: nn.Module, per_rank: int, state: dict | None
) -> tuple[nn.Module, Any, str]:
    """(the module to run, its plan, what the fast path is): the same parameters and math with faster kernels
    (convnext/fast/). In float32 each 1x1 product is timed both ways at this run's micro-batch and image size, as
    optimize() does, once per machine and shape: the plan is kept in the plan cache and every later run takes it, so
    the same command and seed give the same bits. A resumed run keeps the plan it was saved with: products run
    another way round differ in the last bits, and resume is exact."""
    if not (cfg.fast and info.device.type == "cpu" and runs_fast(model)):
        return model, None, "not used"
    if cfg.shard:
        log.info("fast path: off under --shard (FSDP holds each block's weights as shards; the plain model runs)")
        return model, None, "off: --shard runs the plain model (FSDP holds each block's weights as shards)"
    if not fast_usable():
        return model, None, f"off: torch {torch.__version__} is not a release the fast path is tested on (plain model)"
    keep_freed_memory()  # process-wide; this process is a training run
    plan = None
    if state is not None and state.get("plan"):
        plan = plan_from_rows(state["plan"])
    elif cfg.amp == "none" and cfg.fast_plan == "timed":
        if info.is_main:  # timed once, on rank 0, and handed to every rank: all run the same products
            shape = (per_rank, model.cfg.in_chans, cfg.data.img_size, cfg.data.img_size)
            plan, source = cached_plan(model, torch.empty(shape), torch.float32)
            log.info("1x1 plan for %s at %s: %s", cfg.model.name, shape, source)
        plan = plan_from_rows(broadcast_object(plan_to_rows(plan) if info.is_main else None, info))
    return FastConvNeXt(model, plan), plan, "on"


def _check_config(cfg: TrainConfig) -> None:
    """Values no run can use, refused before the data is read or the run folder is touched."""
    bad = []
    if cfg.epochs < 1:
        bad.append(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.amp not in ("auto", "none", "bf16", "fp16"):
        bad.append(f"amp must be auto, none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.budget_min is not None and not cfg.budget_min > 0:
        bad.append(f"budget_min must be > 0 minutes, got {cfg.budget_min}")
    if cfg.data.img_size < 1:
        bad.append(f"data.img_size must be >= 1, got {cfg.data.img_size}")
    if cfg.batch_size < 1:
        bad.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.fast_plan not in ("timed", "default"):
        bad.append(f"fast_plan must be timed or default, got {cfg.fast_plan!r}")
    if cfg.data.translate is not None and cfg.data.translate < 0:
        bad.append(f"data.translate must be >= 0 pixels, got {cfg.data.translate}")
    d = cfg.data
    rates = {"model.drop_path_rate": cfg.model.drop_path_rate, "data.label_smoothing": d.label_smoothing}
    bad += [f"{k} must be in [0, 1), got {v}" for k, v in rates.items() if v is not None and not 0 <= v < 1]
    chances = {"data.re_prob": d.re_prob, "data.mix_prob": d.mix_prob, "data.switch_prob": d.switch_prob}
    bad += [f"{k} must be a probability in [0, 1], got {v}" for k, v in chances.items() if not 0 <= v <= 1]
    lr = cfg.optim.lr
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        bad.append(f"optim.lr must be a positive number, got {lr}")
    if d.balance not in BALANCE_MODES:
        bad.append(f"data.balance must be one of {', '.join(BALANCE_MODES)}, got {d.balance!r}")
    if cfg.shard and cfg.optim.name == "muon":
        bad.append("--shard: optim.name muon orthogonalizes whole weight matrices, which FSDP splits over the "
                   "processes; use --optim.name adamw or sgd")  # fmt: skip
    bad += selection_problems(cfg.select, cfg.early_stop, cfg.trackers)
    if bad:
        raise ValueError("; ".join(bad))
    if cfg.tensorboard:
        require("tensorboard", what="--tensorboard true")
    for t in dict.fromkeys(cfg.trackers):
        require(TRACKERS[t], what=f"--log {t}")


def selection_problems(select: str, early_stop: int, trackers: list[str]) -> list[str]:
    """What is wrong with `--select`, `--early-stop` and `--log` (checked before the data is read)."""
    bad = []
    if select not in SELECT:
        bad.append(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
    if early_stop < 0:
        bad.append(f"--early-stop must be >= 0 evaluated epochs (0 = off), got {early_stop}")
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        bad.append(f"--log must name {' or '.join(TRACKERS)}, got {', '.join(map(repr, unknown))}")
    return bad


def _sample_images(cfg: TrainConfig, count: int = 2048) -> torch.Tensor:
    """Up to `count` training images, evenly spread, decoded at the training size: uint8 (N, 3, S, S)."""
    d = cfg.data
    ds, _ = build_dataset(d.name, "train", decode_transform(d.img_size), data_dir=d.data_dir, val_split=d.val_split,
                          skip_bad_images=True, download=d.download)  # fmt: skip
    picks = range(0, len(ds), max(len(ds) // count, 1))[:count]
    return torch.stack([item[0] for item in (ds[i] for i in picks) if item is not None])


def _cache_plan(cfg: TrainConfig, train_ds: Any, val_ds: Any, info: DistInfo) -> int | None:
    """The side to cache the training images at (and give both datasets their decoding transform), or None for
    the per-image DataLoader path: data.cache off, augmentation that only runs per image (RandAugment, random
    erasing), or a cache larger than its share of the available memory (said in one line)."""
    d = cfg.data
    if d.cache not in ("auto", "on", "off"):
        raise ValueError(f"data.cache must be auto, on or off, not {d.cache!r}")
    if d.cache == "off":
        return None
    per_image = [n for n, on in (("RandAugment", d.randaugment), ("random erasing", d.re_prob > 0)) if on]
    if per_image:
        if d.cache == "on":
            raise ValueError(f"data.cache on: {' and '.join(per_image)} run per image; turn them off or cache off")
        log.info("data: per-image loading (%s run per image, not on cached batches)", " and ".join(per_image))
        return None
    size = cache_size(d.img_size, d.crop, typical_short_side(train_ds))
    need = len(train_ds) * 3 * size * size + len(val_ds) * 3 * d.img_size**2
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    fits, figures = fits_in_memory(need, d.cache_memory_share, local)
    if not fits:
        if d.cache == "on":
            raise ValueError(f"data.cache on: the decoded images do not fit ({figures})")
        log.info("data: not cached in memory (%s); decoding per image with %d workers", figures, d.num_workers)
        return None
    set_transform(train_ds, decode_transform(size))
    set_transform(val_ds, decode_transform(d.img_size, d.crop_pct, d.interpolation))
    return size


def _check_size(model: ConvNeXt, img_size: int, per_rank: int, info: DistInfo) -> None:
    """Refuse, before the data is decoded, an input size the model cannot take (under its total stride: the last
    stage would have no pixels) or whose activations for one micro-batch would not fit in the free memory (CPU)."""
    c = model.cfg
    stride = c.patch_size * 2 ** (len(c.depths) - 1)
    if img_size < stride:
        raise ValueError(
            f"data.img_size {img_size} is smaller than the model's total stride {stride} (stem "
            f"{c.patch_size} x {2 ** (len(c.depths) - 1)}): the last stage would have no pixels"
        )
    if info.device.type != "cpu":
        return
    probe = 2 * stride  # measured at a small size, scaled by the pixels
    saved_mb, _ = activation_memory(model, probe)
    need = saved_mb * 2**20 * (img_size / probe) ** 2 * per_rank
    free = memory_available()
    if free is not None and need > free:
        raise ValueError(
            f"data.img_size {img_size} at {per_rank} images per step needs about {need / 2**30:.1f} "
            f"GiB for activations, {free / 2**30:.1f} GiB is free: lower --img-size or --batch-size"
        )

"""`fit(cfg)`: train (or fine-tune, or resume) one run end to end; `load_run(dir)`: a trained model back.

Everything that can be checked is checked before the first step: the run folder, the data (empty, class mismatch
between train and val, batch larger than the dataset), and the weights to resume from or start from.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from convnext import kernels
from convnext.data import SeededDataset, build_dataset, collate_skip, eval_transform, mix_transform, train_transform
from convnext.data.cache import (
    BatchAugment,
    CachedLoader,
    cache_size,
    decode_all,
    decode_transform,
    fits_in_memory,
    typical_short_side,
)
from convnext.data.datasets import align_classes, set_transform
from convnext.engine import checkpoint as ckpt
from convnext.engine.budget import BudgetClock
from convnext.engine.distributed import (
    DistInfo,
    ResumableSampler,
    ShardSampler,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    init_distributed,
)
from convnext.engine.ema import build_ema
from convnext.engine.report import MetricsLog, plot_curves
from convnext.extras import require
from convnext.fast import FastConvNeXt, keep_freed_memory, plan_from_rows, plan_pointwise, plan_to_rows
from convnext.fast import usable as fast_usable
from convnext.model import ConvNeXt
from convnext.train.config import TrainConfig, resolve_preprocessing
from convnext.train.loop import NonFiniteLossError, evaluate, train_one_epoch
from convnext.train.optim import build_optimizer, lr_at, scaled_lr
from convnext.train.runs import build_model, check_run_dir, claim_run_dir
from convnext.train.whiten import whiten_stem

log = logging.getLogger("convnext.train")


def shrink_schedule(planned: dict[str, int], total: int) -> dict[str, int]:
    """The schedule `planned` compressed to `total` steps: warmup and step decay keep their share of the run."""
    ratio = total / planned["total_steps"]
    return {
        **planned,
        "total_steps": total,
        "warmup_steps": round(planned["warmup_steps"] * ratio),
        "step_size": max(round(planned["step_size"] * ratio), 1),
    }


def fit(cfg: TrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Train `cfg` (one process, or one rank of a torchrun job) and return the final metrics:
    {"top1", "top5", "loss", "n", "ema_top1"..., "best_top1", "epochs", "steps", "img_per_s", "run_dir", ...}.

    The run folder (`cfg.output`, or `cfg.resume` to continue a run) gets config.json, metrics.csv/.jsonl,
    curves.png, last.pt, best.pt and results.json.

    model: train this module (e.g. a timm or torchvision network, for comparisons) instead of building
        `cfg.model`; it must output `len(classes)` logits. `load_run` cannot rebuild such a run.
    """
    cfg = copy.deepcopy(cfg)  # the run resolves fields (lr, classes); the caller's config stays as given
    info = init_distributed(cfg.device)
    started_group = info.distributed
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, released when the run ends
            return _fit(cfg, info, model, held)
    finally:
        if started_group:
            cleanup()


def _fit(cfg: TrainConfig, info: DistInfo, module: nn.Module | None, held: contextlib.ExitStack) -> dict[str, Any]:
    t_setup = time.perf_counter()
    if not info.is_main:
        log.setLevel(logging.WARNING)
    if cfg.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    _check_config(cfg)
    cfg.recipe += resolve_preprocessing(cfg)  # mean, std and eval resize of the weights the run starts from
    run_dir = Path(cfg.resume or cfg.output)
    cfg.output = str(run_dir)
    old_files = check_run_dir(run_dir, bool(cfg.resume), cfg.overwrite)
    for line in cfg.recipe:
        log.info("recipe: %s", line)

    # ---- data: every check before any work
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
            d.img_size,
            crop=d.crop,
            scale=d.scale,
            hflip=d.hflip,
            translate=d.translate,
            randaugment=d.randaugment,
            ra_num_ops=d.ra_num_ops,
            ra_magnitude=d.ra_magnitude,
            ra_magnitude_std=d.ra_magnitude_std,
            re_prob=d.re_prob,
            mean=d.mean,
            std=d.std,
        ))  # fmt: skip
        set_transform(val_ds, eval_transform(d.img_size, d.crop_pct, d.mean, d.std, d.interpolation))
    per_rank = per_rank_batch(cfg, info, len(train_ds))
    train_cache = val_cache = None
    if cache is not None:
        t_cache = time.perf_counter()
        train_cache = decode_all(train_ds, cache, workers=d.num_workers)
        val_cache = decode_all(val_ds, d.img_size, workers=d.num_workers)
        log.info(
            "decoded %d train images at %dx%d and %d val images at %dx%d into memory in %.1fs%s",
            len(train_cache), cache, cache, len(val_cache), d.img_size, d.img_size, time.perf_counter() - t_cache,
            f"; skipped {train_cache.skipped + val_cache.skipped} unreadable" if train_cache.skipped + val_cache.skipped
            else "",
        )  # fmt: skip

    # ---- model, EMA, optimizer (same init on every rank; then per-rank randomness)
    torch.manual_seed(cfg.seed)
    model = module if module is not None else build_model(cfg.model, len(classes), init_weights=not cfg.resume)
    if cfg.model.stem_init not in ("default", "whiten"):
        raise ValueError(f"model.stem_init must be default or whiten, not {cfg.model.stem_init!r}")
    fresh = module is None and not (cfg.resume or cfg.model.pretrained or cfg.model.checkpoint)
    if cfg.model.stem_init == "whiten" and fresh:
        images = train_cache.images if train_cache is not None else _sample_images(cfg, common)
        whiten_stem(model.stem[0], images, d.mean, d.std, seed=cfg.seed)
    state = None
    if cfg.resume:
        state = ckpt.load(run_dir / "last.pt")
        ckpt.check_compatible(model, state["model"], f"checkpoint {run_dir / 'last.pt'}")
        model.load_state_dict(state["model"])
    torch.manual_seed(cfg.seed + info.rank)
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    ema = build_ema(model, cfg.ema_decay) if cfg.ema else None

    lr = (
        cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, cfg.batch_size, cfg.optim.base_batch)
    )
    cfg.optim.lr = lr  # saved resolved: a resumed run (even on another number of processes) keeps it
    o = cfg.optim
    optimizer = build_optimizer(
        model,
        o.name,
        lr,
        o.weight_decay,
        layer_decay=o.layer_decay,
        betas=o.betas,
        eps=o.eps,
        momentum=o.momentum,
        nesterov=o.nesterov,
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    if cache is not None:
        sampler = ResumableSampler(train_cache, info, cfg.seed, shuffle=True, drop_last=True)
        augment = BatchAugment(
            d.img_size, crop=d.crop, scale=d.scale, hflip=d.hflip, translate=d.translate, mean=d.mean, std=d.std
        )
        train_loader: Any = CachedLoader(
            train_cache, sampler, per_rank, augment=augment, drop_last=True, seed=cfg.seed, rank=info.rank,
            world=info.world_size,
        )  # fmt: skip
        val_loader: Any = CachedLoader(
            val_cache, ShardSampler(len(val_cache), info), max(per_rank, 64), normalise=(d.mean, d.std)
        )
    else:
        train_set = SeededDataset(train_ds, cfg.seed)
        sampler = ResumableSampler(train_set, info, cfg.seed, shuffle=True, drop_last=True)
        loader_args = dict(
            num_workers=d.num_workers, pin_memory=d.pin_memory and info.device.type == "cuda", collate_fn=collate_skip
        )
        train_loader = DataLoader(
            train_set, batch_size=per_rank, sampler=sampler, drop_last=True, generator=torch.Generator(), **loader_args
        )
        val_loader = DataLoader(
            val_ds, batch_size=max(per_rank, 64), sampler=ShardSampler(len(val_ds), info), **loader_args
        )
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {cfg.batch_size} with accum_steps {cfg.accum_steps} leaves no full step per epoch"
        )
    sched = {
        "total_steps": cfg.epochs * steps_per_epoch,
        "warmup_steps": round(cfg.sched.warmup_epochs * steps_per_epoch),
        "step_size": max(round(cfg.sched.step_epochs * steps_per_epoch), 1),
        "steps_per_epoch": steps_per_epoch,
    }

    start_epoch, epoch_step, step, best = 0, 0, 0, -1.0
    carry = (0.0, 0)  # the resumed epoch's loss so far: (sum of per-image losses, images)
    if state is not None:
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            raise ValueError(
                f"{run_dir}: the run had {state['steps_per_epoch']} steps per epoch, now {steps_per_epoch}; "
                "resume with the same batch size and data"
            )
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if cfg.budget_min is not None:  # keep the schedule that was fitted to the budget
            sched.update(state["scheduler"])
        start_epoch, epoch_step, step = state["epoch"], state["epoch_step"], state["step"]
        best = state.get("best_top1", -1.0)
        if epoch_step > 0 and state.get("epoch_loss"):
            carry = (float(state["epoch_loss"][0]), int(state["epoch_loss"][1]))
        rngs = state["rng"]
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
        else:
            log.warning("resuming on %d processes, saved on %d: random streams restart", info.world_size, len(rngs))
        log.info("resuming %s at epoch %d, step %d", run_dir, start_epoch, step)
        saved_epochs = state.get("config", {}).get("epochs", cfg.epochs)
        if saved_epochs != cfg.epochs and cfg.budget_min is None:
            log.info(
                "the run had %d epochs, now %d: the lr schedule is the one for %d epochs from step %d on (the steps "
                "already trained keep the lr they had)", saved_epochs, cfg.epochs, cfg.epochs, step,
            )  # fmt: skip
        if start_epoch == cfg.epochs and epoch_step == 0:
            log.info("the run is already finished (%d epochs)", cfg.epochs)

    raw_model, plan, fast_path = model, None, "not used"
    wants_fast = cfg.fast and info.device.type == "cpu" and isinstance(model, ConvNeXt)
    if wants_fast and not fast_usable():
        fast_path = f"off: torch {torch.__version__} is not a release the fast path is tested on (plain model)"
    elif wants_fast:
        fast_path = "on"
        keep_freed_memory()  # process-wide; this process is a training run
        # the same parameters and math, faster kernels (convnext/fast/); in float32 each 1x1 product is timed
        # both ways at this run's micro-batch and image size, as optimize() does. A resumed run keeps the plan it
        # was saved with: products run another way round differ in the last bits, and resume is exact.
        shape = (per_rank, model.cfg.in_chans, cfg.data.img_size, cfg.data.img_size)
        if state is not None and state.get("plan"):
            plan = plan_from_rows(state["plan"])
        elif cfg.amp == "none" and cfg.fast_plan == "timed":
            if info.is_main:  # timed once, on rank 0, and handed to every rank: all run the same products
                plan = plan_pointwise(model, torch.empty(shape), torch.float32)
            plan = plan_from_rows(broadcast_object(plan_to_rows(plan) if info.is_main else None, info))
        model = FastConvNeXt(model, plan)
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        model = torch.compile(model)

    # ---- run folder
    metrics = None
    if info.is_main:
        claim_run_dir(run_dir, old_files, held)  # --overwrite: the old run goes only now data and model are built
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics = MetricsLog(run_dir, tensorboard=cfg.tensorboard)
        if state is not None:
            metrics.truncate_after(start_epoch)  # rows of finished epochs stay; a half epoch's is redone
    log.info(
        "training %s on %s (%d train / %d val images, %d classes) for %d epochs x %d steps, batch %d "
        "(%d per process x %d processes x %d accumulation), lr %.3g, %s",
        cfg.model.name + (f" {cfg.model.kwargs}" if cfg.model.kwargs else ""),
        d.name,
        len(train_ds),
        len(val_ds),
        len(classes),
        cfg.epochs,
        steps_per_epoch,
        cfg.batch_size,
        per_rank,
        info.world_size,
        cfg.accum_steps,
        lr,
        info.device,
    )

    def lr_fn(s: int) -> float:
        return lr_at(
            s,
            lr=lr,
            total_steps=sched["total_steps"],
            warmup_steps=sched["warmup_steps"],
            name=cfg.sched.name,
            min_lr=cfg.sched.min_lr,
            warmup_lr=cfg.sched.warmup_lr,
            step_size=sched["step_size"],
            gamma=cfg.sched.gamma,
        )

    def save(path: Path, epoch: int, e_step: int, s: int, extra: dict | None = None) -> None:
        rngs = [ckpt.rng_state()]
        if info.distributed:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, ckpt.rng_state())
        if not info.is_main:
            return
        payload = {
            "model": raw_model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": dict(sched),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "epoch": epoch,
            "epoch_step": e_step,
            "step": s,
            "steps_per_epoch": steps_per_epoch,
            "best_top1": best,
            "config": cfg.to_dict(),
            "plan": plan_to_rows(plan) if plan else None,
            **(extra or {}),
        }
        ckpt.save_atomic(payload, path)

    trained = {"images": 0, "time": 0.0}
    planned = dict(sched)
    budget = BudgetClock(cfg.budget_min * 60 if cfg.budget_min is not None else None, planned["total_steps"], step)
    t0 = budget.t0

    def fit_schedule_to_budget(s: int) -> None:
        """Shorten the schedule to the steps that fit in the budget at the speed measured so far."""
        total = int(broadcast_object(budget.total_steps(s), info))
        sched.update(shrink_schedule(planned, total))

    def out_of_time() -> bool:
        return bool(all_reduce_sum(torch.tensor(float(budget.out_of_time())), info) > 0)

    last_row: dict[str, Any] = {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch, skip=epoch_step * per_rank * cfg.accum_steps)
            (train_loader if cache is not None else train_loader.dataset).set_epoch(epoch)

            def on_step(s: int, n: int, loss_so_far: Any, epoch: int = epoch, offset: int = epoch_step) -> None:
                if budget.step_done(s):
                    fit_schedule_to_budget(s)
                if cfg.ckpt_every_steps and s % cfg.ckpt_every_steps == 0 and offset + n < steps_per_epoch:
                    save(run_dir / "last.pt", epoch, offset + n, s, {"epoch_loss": list(loss_so_far())})

            r = train_one_epoch(
                model,
                train_loader,
                optimizer,
                info=info,
                lr_fn=lr_fn,
                step=step,
                accum_steps=cfg.accum_steps,
                mix=mix_transform(len(classes), d.mixup, d.cutmix, d.switch_prob, d.mix_prob),
                label_smoothing=d.label_smoothing,
                amp=cfg.amp,
                scaler=scaler,
                clip_grad=o.clip_grad,
                ema=ema,
                channels_last=cfg.channels_last,
                on_step=on_step,
                should_stop=out_of_time if budget.seconds is not None else None,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                total=(steps_per_epoch - epoch_step) * cfg.accum_steps,
                carry=carry,
            )
            carry = (0.0, 0)
            t_epoch_end = time.perf_counter()
            step = r["step"]
            trained["images"] += r["images"]
            trained["time"] += r["time"]
            stopped = r["stopped"]
            done_epoch = epoch_step + r["steps"] >= steps_per_epoch
            last_row = {
                "epoch": epoch + 1,
                "step": step,
                "lr": r["lr"],
                "train_loss": r["loss"],
                "img_per_s": r["img_per_s"],
                "epoch_time_s": r["time"],
                "skipped_images": r["skipped"] + (train_cache.skipped if cache is not None else 0),
                "data_wait_pct": 100.0 * r["data_time"] / max(r["time"], 1e-9),
            }
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or stopped:
                last_row |= _eval_row(raw_model, ema, val_loader, info, cfg)
            last_row["elapsed_s"] = time.perf_counter() - t0
            epoch_step = 0 if done_epoch else epoch_step + r["steps"]
            next_epoch = epoch + 1 if done_epoch else epoch
            improved = "val_top1" in last_row and last_row["val_top1"] > best
            if improved:
                best = last_row["val_top1"]
            partial = None if done_epoch else {"epoch_loss": [r["loss_sum"], r["loss_images"]]}
            save(run_dir / "last.pt", next_epoch, epoch_step, step, partial)
            if improved and info.is_main:
                shutil.copyfile(run_dir / "last.pt", run_dir / ".best.pt.tmp")
                (run_dir / ".best.pt.tmp").replace(run_dir / "best.pt")
            if info.is_main:
                metrics.append(last_row)
                plot_curves(metrics.rows(), run_dir / "curves.png")
                log.info(_epoch_line(last_row, cfg.epochs))
            budget.paused += time.perf_counter() - t_epoch_end
            if budget.seconds is not None and not stopped:
                fit_schedule_to_budget(step)
            if stopped:
                log.info("time budget of %.1f min spent after %d steps", cfg.budget_min, step)
                break
    except NonFiniteLossError as e:
        raise NonFiniteLossError(
            f"{e}: stopping; {_diverged_note(run_dir)}. Try a lower --optim.lr or --optim.clip_grad 1.0"
        ) from None
    finally:
        if metrics is not None:
            metrics.close()

    if "val_top1" not in last_row:  # resumed a finished run, or eval_every skipped the end
        last_row |= _eval_row(raw_model, ema, val_loader, info, cfg)
    result = {
        "top1": last_row["val_top1"],
        "top5": last_row["val_top5"],
        "loss": last_row["val_loss"],
        "n": last_row.get("val_n"),
        "classes": list(classes),
        **{k: last_row[k] for k in ("ema_top1", "ema_top5", "ema_loss") if k in last_row},
        "best_top1": max(best, last_row["val_top1"]),
        "train_loss": last_row.get("train_loss"),
        "img_per_s": trained["images"] / trained["time"] if trained["time"] else None,  # training, all processes
        "epochs": epoch + 1 if last_row else start_epoch,
        "steps": step,
        "time_s": time.perf_counter() - t0,
        "train_s": budget.clock(),  # what the budget counts
        "setup_s": t0 - t_setup,  # data scan and decoding, model, plan: before the budget's clock starts
        # what the CPU fast path ran on: the C kernels, or aten's where they could not be built (said once)
        "fast_path": fast_path,
        "c_kernels": kernels.status() if fast_path == "on" else "not used",
        "run_dir": str(run_dir),
    }
    if info.is_main:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _eval_row(model: nn.Module, ema: nn.Module | None, loader: DataLoader, info: DistInfo, cfg: TrainConfig) -> dict:
    d = cfg.data
    kw = dict(info=info, amp=cfg.amp, channels_last=cfg.channels_last, tta_flip=d.tta_flip, tta_shift=d.tta_shift)
    m = evaluate(model, loader, desc="eval", **kw)
    row = {"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"], "val_n": m["n"]}
    if ema is not None:
        e = evaluate(ema.module, loader, desc="eval EMA", **kw)
        row |= {"ema_loss": e["loss"], "ema_top1": e["top1"], "ema_top5": e["top5"]}
    if m["skipped"]:
        row["val_skipped"] = m["skipped"]
    return row


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    if "val_top1" in row:
        parts.append(f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% loss {row['val_loss']:.4f}")
    if "ema_top1" in row:
        parts.append(f"EMA top-1 {row['ema_top1']:.2f}%")
    parts.append(f"lr {row['lr']:.3g}  {row['img_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s")
    if row.get("skipped_images"):
        parts.append(f"skipped {row['skipped_images']} unreadable images")
    return "  ".join(parts)


def _diverged_note(run_dir: Path) -> str:
    """What a diverged run leaves: last.pt was saved before the loss went non-finite, but its weights may already
    have blown up (the loss lags the weights), so say how large they are; best.pt is the last scored epoch's."""
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if not last.exists():
        return "no checkpoint was written yet"
    state = ckpt.load(last)
    weights = [t for t in state["model"].values() if t.is_floating_point()]
    finite = all(bool(torch.isfinite(t).all()) for t in weights)
    size = max((float(t.abs().max()) for t in weights if t.numel()), default=0.0) if finite else float("inf")
    step = state.get("step", "?")
    note = f"{last} holds step {step}'s weights (largest |w| {size:.3g}; they may already have diverged)"
    return note + (f"; {best} holds the best scored epoch" if best.exists() else "; no epoch was scored yet")


def _check_config(cfg: TrainConfig) -> None:
    """Values no run can use, refused before the data is read or the run folder is touched."""
    bad = []
    if cfg.epochs < 1:
        bad.append(f"epochs must be >= 1, got {cfg.epochs}")
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
    if bad:
        raise ValueError("; ".join(bad))
    if cfg.tensorboard:
        require("tensorboard", what="--tensorboard true")


def _sample_images(cfg: TrainConfig, common: dict[str, Any], count: int = 2048) -> torch.Tensor:
    """Up to `count` training images, evenly spread, decoded at the training size: uint8 (N, 3, S, S)."""
    size = cfg.data.img_size
    ds, _ = build_dataset(cfg.data.name, "train", decode_transform(size), **(common | {"skip_bad_images": True}))
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


def per_rank_batch(cfg: Any, info: DistInfo, n_train: int) -> int:
    """Each process's micro-batch for `cfg.batch_size` images per optimizer step (a train or pretrain config)."""
    parts = info.world_size * cfg.accum_steps
    if cfg.batch_size < 1 or cfg.batch_size % parts:
        raise ValueError(
            f"batch size {cfg.batch_size} must be a positive multiple of processes x accum_steps ({parts})"
        )
    if cfg.batch_size > n_train:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set ({n_train} images)")
    return cfg.batch_size // parts

"""`pretrain(cfg)`: FCMAE pre-training of one run end to end, with `convnext train`'s machinery: the run folder and its
lock, config.json, metrics.csv/.jsonl, atomic checkpoints and exact resume, torchrun DDP, the time budget, the
in-memory image cache and the CPU fast path; plus reconstructions/epoch_NNN.png, a picture of masked inputs and
their reconstructions after every epoch.

Every check runs before the first step: the config (mask ratio, sizes), the run folder, the data (no images, images
smaller than the masking patch, an input size the patches do not tile), and the weights to resume from.

The masks are a function of (seed, optimizer step, micro-batch) and of each image's place in the global batch,
like the cached crops: a resumed run and a run on N processes mask the same images the same way as one process.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from convnext import kernels
from convnext.data import SeededDataset, build_dataset, collate_skip, train_transform
from convnext.data.cache import (
    BatchAugment,
    CachedLoader,
    Normalise,
    cache_size,
    decode_all,
    decode_transform,
    fits_in_memory,
    typical_short_side,
)
from convnext.data.datasets import set_transform
from convnext.engine import checkpoint as ckpt
from convnext.engine.budget import BudgetClock
from convnext.engine.distributed import (
    DistInfo,
    ResumableSampler,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    init_distributed,
)
from convnext.engine.report import MetricsLog
from convnext.extras import require
from convnext.fast import keep_freed_memory
from convnext.fast import usable as fast_usable
from convnext.pretrain.config import PretrainConfig, encoder_config, pick_input, total_stride
from convnext.pretrain.fcmae import FCMAE, FCMAEConfig, default_decoder_dim, mask_grid, random_mask, visible_count
from convnext.pretrain.report import save_reconstructions
from convnext.registry import create_model
from convnext.train.fit import per_rank_batch, shrink_schedule
from convnext.train.loop import NonFiniteLossError, autocast, train_one_epoch
from convnext.train.optim import build_optimizer, lr_at, scaled_lr
from convnext.train.runs import check_run_dir, claim_run_dir

log = logging.getLogger("convnext.pretrain")

PICTURES = "reconstructions"  # the run folder's subfolder of per-epoch PNGs
RUN_FILES = ("config.json", "last.pt", "metrics.csv", "metrics.jsonl", "results.json")
COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "img_per_s", "epoch_time_s", "elapsed_s", "skipped_images")
SHOWN = 8  # images per picture


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train `cfg` (one process, or one rank of a torchrun job) and return the final metrics:
    {"loss" (val), "train_loss", "epochs", "steps", "img_per_s", "img_size", "patch_px", "grid", "run_dir", ...}."""
    cfg = copy.deepcopy(cfg)  # the run resolves fields (size, stem, lr); the caller's config stays as given
    info = init_distributed(cfg.device)
    started_group = info.distributed
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, released when the run ends
            return _pretrain(cfg, info, held)
    finally:
        if started_group:
            cleanup()


def _pretrain(cfg: PretrainConfig, info: DistInfo, held: contextlib.ExitStack) -> dict[str, Any]:
    t_setup = time.perf_counter()
    if not info.is_main:
        log.setLevel(logging.WARNING)
    if cfg.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    _check_config(cfg)
    run_dir = Path(cfg.resume or cfg.output)
    cfg.output = str(run_dir)
    old_files = check_run_dir(run_dir, bool(cfg.resume), cfg.overwrite, RUN_FILES)

    # ---- data, then what it decides (input size, stem), all checked before any work
    d = cfg.data
    common = dict(data_dir=d.data_dir, val_split=d.val_split, skip_bad_images=d.skip_bad_images, download=d.download)
    train_ds, _ = build_dataset(d.name, "train", None, **common)
    val_ds, _ = build_dataset(d.name, "val", None, **common)
    side = typical_short_side(train_ds)
    enc = encoder_config(cfg.model)
    d.img_size, cfg.model.patch_size, why = pick_input(enc, side, d.img_size, cfg.model.patch_size)
    cfg.recipe += why
    stride = total_stride(enc, cfg.model.patch_size)
    if side is not None and side < stride:
        raise ValueError(
            f"the images of {d.name} are {side}px on the short side, smaller than the {stride}px masking patch (the "
            f"encoder's total stride, stem {cfg.model.patch_size} x {stride // cfg.model.patch_size}); choose a "
            "smaller stem (--model.patch_size) or larger images"
        )
    if cfg.fcmae.decoder_dim is None:
        cfg.fcmae.decoder_dim = default_decoder_dim(enc.dims[-1])
    m = cfg.fcmae
    fcmae_cfg = FCMAEConfig(m.mask_ratio, m.decoder_dim, m.decoder_depth, m.norm_pix_loss)
    grid = mask_grid(d.img_size, d.img_size, stride, m.mask_ratio)  # raises when the patches do not tile the input
    if min(grid) < 4:
        log.warning("the mask grid is %dx%d (the paper's is 7x7): a coarse grid makes a weak task", *grid)
    for line in cfg.recipe:
        log.info("recipe: %s", line)
    per_rank = per_rank_batch(cfg, info, len(train_ds))
    train_images, per_image = _train_source(cfg, train_ds, info)
    eval_x = _eval_images(cfg, val_ds)

    # ---- model and optimizer (the same init on every rank)
    torch.manual_seed(cfg.seed)
    kwargs = cfg.model.build_kwargs() | {"num_classes": 0}
    init = {} if cfg.resume else {"pretrained": cfg.model.pretrained, "checkpoint": cfg.model.checkpoint}
    name = cfg.model.name if init.get("pretrained") else cfg.model.name.split(".")[0]  # a tag means its weights
    fast = cfg.fast and info.device.type == "cpu" and fast_usable()
    model = FCMAE(create_model(name, **init, **kwargs), fcmae_cfg, fast=fast)
    state = None
    if cfg.resume:
        state = ckpt.load(run_dir / "last.pt")
        ckpt.check_compatible(model, state["model"], f"checkpoint {run_dir / 'last.pt'}")
        model.load_state_dict(state["model"])
    if fast:
        keep_freed_memory()  # process-wide; this process is a training run
    model.to(info.device)
    o = cfg.optim
    lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, cfg.batch_size, o.base_batch)
    o.lr = lr  # saved resolved
    optimizer = build_optimizer(model, o.name, lr, o.weight_decay, betas=o.betas, eps=o.eps, momentum=o.momentum,
                                nesterov=o.nesterov)  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    raw_model = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    sampler = ResumableSampler(train_images, info, cfg.seed, shuffle=True, drop_last=True)
    if per_image:
        loader_args = dict(num_workers=d.num_workers, pin_memory=d.pin_memory and info.device.type == "cuda")
        train_loader: Any = DataLoader(
            train_images, batch_size=per_rank, sampler=sampler, drop_last=True, generator=torch.Generator(),
            collate_fn=collate_skip, **loader_args,
        )  # fmt: skip
    else:
        augment = BatchAugment(d.img_size, crop="rrc", scale=d.scale, hflip=d.hflip, mean=d.mean, std=d.std)
        train_loader = CachedLoader(train_images, sampler, per_rank, augment=augment, drop_last=True, seed=cfg.seed,
                                    rank=info.rank, world=info.world_size)  # fmt: skip
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"batch {cfg.batch_size} with accum_steps {cfg.accum_steps} leaves no full step per epoch")
    sched = {
        "total_steps": cfg.epochs * steps_per_epoch,
        "warmup_steps": round(cfg.sched.warmup_epochs * steps_per_epoch),
        "step_size": max(round(cfg.sched.step_epochs * steps_per_epoch), 1),
        "steps_per_epoch": steps_per_epoch,
    }

    start_epoch, epoch_step, step, carry = 0, 0, 0, (0.0, 0)
    torch.manual_seed(cfg.seed + info.rank)  # per-rank randomness (stochastic depth)
    if state is not None:
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"{run_dir}: the run had {state['steps_per_epoch']} steps per epoch, now {steps_per_epoch}; "
                "resume with the same batch size and data"
            )
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if cfg.budget_min is not None:  # keep the schedule that was fitted to the budget
            sched.update(state["scheduler"])
        start_epoch, epoch_step, step = state["epoch"], state["epoch_step"], state["step"]
        if epoch_step > 0 and state.get("epoch_loss"):
            carry = (float(state["epoch_loss"][0]), int(state["epoch_loss"][1]))
        if len(state["rng"]) == info.world_size:
            ckpt.set_rng_state(state["rng"][info.rank])
        log.info("resuming %s at epoch %d, step %d", run_dir, start_epoch, step)

    # ---- run folder
    metrics = None
    if info.is_main:
        claim_run_dir(run_dir, old_files, held)  # --overwrite: the old run goes only now data and model are built
        if old_files:
            shutil.rmtree(run_dir / PICTURES, ignore_errors=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics = MetricsLog(run_dir, tensorboard=cfg.tensorboard, columns=COLUMNS)
        if state is not None:
            metrics.truncate_after(start_epoch)
    log.info(
        "pre-training %s (FCMAE: %dpx patches, a %dx%d grid, %.0f%% masked, decoder %d x %d) on %s (%d images, "
        "%d val) at %dpx for %d epochs x %d steps, batch %d (%d per process x %d processes x %d accumulation), "
        "lr %.3g, %s",
        cfg.model.name, stride, *grid, 100 * cfg.fcmae.mask_ratio, cfg.fcmae.decoder_depth, cfg.fcmae.decoder_dim,
        d.name, len(train_ds), len(eval_x), d.img_size, cfg.epochs, steps_per_epoch, cfg.batch_size, per_rank,
        info.world_size, cfg.accum_steps, lr, info.device,
    )  # fmt: skip

    def lr_fn(s: int) -> float:
        c = cfg.sched
        return lr_at(s, lr=lr, total_steps=sched["total_steps"], warmup_steps=sched["warmup_steps"], name=c.name,
                     min_lr=c.min_lr, warmup_lr=c.warmup_lr, step_size=sched["step_size"], gamma=c.gamma)  # fmt: skip

    def save(epoch: int, e_step: int, s: int, epoch_loss: list | None = None) -> None:
        rngs = [ckpt.rng_state()]
        if info.distributed:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, ckpt.rng_state())
        if not info.is_main:
            return
        payload = {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": dict(sched),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "epoch": epoch,
            "epoch_step": e_step,
            "step": s,
            "steps_per_epoch": steps_per_epoch,
            "epoch_loss": epoch_loss,
            "config": cfg.to_dict(),
        }
        ckpt.save_atomic(payload, run_dir / "last.pt")

    global_batch = per_rank * info.world_size
    masks = _mask_stream(cfg.seed, global_batch, grid, cfg.fcmae.mask_ratio, info)
    eval_masks = random_mask(len(eval_x), grid, cfg.fcmae.mask_ratio, generator=torch.Generator().manual_seed(cfg.seed))
    shown = torch.arange(0, len(eval_x), max(len(eval_x) // SHOWN, 1))[:SHOWN]  # spread over the (sorted) classes

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

    row: dict[str, Any] = {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch, skip=epoch_step * per_rank * cfg.accum_steps)
            (train_loader.dataset if per_image else train_loader).set_epoch(epoch)

            def on_step(s: int, n: int, loss_so_far: Callable, epoch: int = epoch, offset: int = epoch_step) -> None:
                if budget.step_done(s):
                    fit_schedule_to_budget(s)
                if cfg.ckpt_every_steps and s % cfg.ckpt_every_steps == 0 and offset + n < steps_per_epoch:
                    save(epoch, offset + n, s, list(loss_so_far()))

            r = pretrain_one_epoch(
                model, train_loader, optimizer, info=info, lr_fn=lr_fn, step=step, masks=masks,
                accum_steps=cfg.accum_steps, amp=cfg.amp, scaler=scaler, clip_grad=o.clip_grad, on_step=on_step,
                should_stop=out_of_time if budget.seconds is not None else None, carry=carry,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
            )  # fmt: skip
            carry = (0.0, 0)
            t_end = time.perf_counter()
            step = r["step"]
            trained["images"] += r["images"]
            trained["time"] += r["time"]
            done_epoch = epoch_step + r["steps"] >= steps_per_epoch
            row = {
                "epoch": epoch + 1,
                "step": step,
                "lr": r["lr"],
                "train_loss": r["loss"],
                "img_per_s": r["img_per_s"],
                "epoch_time_s": r["time"],
                "skipped_images": r["skipped"] + (0 if per_image else train_images.skipped),
                "data_wait_pct": 100.0 * r["data_time"] / max(r["time"], 1e-9),
            }
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or r["stopped"]:
                row["val_loss"] = evaluate(raw_model, eval_x, eval_masks, per_rank, info, cfg.amp)
            row["elapsed_s"] = time.perf_counter() - t0
            epoch_step = 0 if done_epoch else epoch_step + r["steps"]
            save(epoch + 1 if done_epoch else epoch, epoch_step, step,
                 None if done_epoch else [r["loss_sum"], r["loss_images"]])  # fmt: skip
            if info.is_main:
                metrics.append(row)
                pictures = run_dir / PICTURES / f"epoch_{epoch + 1:03d}.png"
                save_reconstructions(raw_model, eval_x[shown], eval_masks[shown], d.mean, d.std, pictures)
                log.info(_epoch_line(row, cfg.epochs))
            budget.paused += time.perf_counter() - t_end
            if budget.seconds is not None and not r["stopped"]:
                fit_schedule_to_budget(step)
            if r["stopped"]:
                log.info("time budget of %.1f min spent after %d steps", cfg.budget_min, step)
                break
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; {run_dir / 'last.pt'} holds the last checkpoint saved before it") from None
    finally:
        if metrics is not None:
            metrics.close()

    if "val_loss" not in row:  # resumed a finished run, or eval_every skipped the end
        row["val_loss"] = evaluate(raw_model, eval_x, eval_masks, per_rank, info, cfg.amp)
    result = {
        "loss": row["val_loss"],
        "train_loss": row.get("train_loss"),
        "epochs": epoch + 1 if "epoch" in row else start_epoch,
        "steps": step,
        "img_per_s": trained["images"] / trained["time"] if trained["time"] else None,
        "img_size": d.img_size,
        "patch_px": stride,
        "grid": list(grid),
        "visible_patches": visible_count(grid, cfg.fcmae.mask_ratio),
        "time_s": time.perf_counter() - t0,
        "train_s": budget.clock(),
        "setup_s": t0 - t_setup,
        "fast_path": "on" if fast else "not used" if not (cfg.fast and info.device.type == "cpu") else "off",
        "c_kernels": kernels.status() if fast else "not used",
        "run_dir": str(run_dir),
    }
    if info.is_main:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def pretrain_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    info: DistInfo,
    masks: Callable[[int, int], torch.Tensor],
    amp: str = "none",
    **loop: Any,
) -> dict[str, Any]:
    """One pass of the trainer's epoch loop (`train.loop.train_one_epoch`, which takes the other arguments) with
    the FCMAE loss: `masks(micro_batch_index, n)` gives each batch's masks (B, h, w); the labels are not used."""

    def fcmae_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
        with autocast(info.device, amp):
            loss, _, _ = model(x, masks(index, len(x)))
        return loss.float()

    return train_one_epoch(model, loader, optimizer, info=info, amp=amp, batch_loss=fcmae_loss, **loop)


@torch.no_grad()
def evaluate(
    model: FCMAE, images: torch.Tensor, masks: torch.Tensor, batch: int, info: DistInfo, amp: str = "none"
) -> float:
    """The mean loss over `images` (normalised, (N, C, H, W)) with their fixed `masks`, shared over processes."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64)
    mine = torch.arange(info.rank, len(images), info.world_size)
    for idx in mine.split(max(batch, 1)):
        x = images[idx].to(device)
        with autocast(device, amp):
            pred = model.forward_decoder(model.forward_encoder(x, masks[idx].to(device)), masks[idx].to(device))
        sums[0] += model.forward_loss(x, pred, masks[idx].to(device)).double().sum().cpu()
        sums[1] += len(idx)
    sums = all_reduce_sum(sums, info)
    return float(sums[0] / sums[1].clamp(min=1))


def _mask_stream(
    seed: int, global_batch: int, grid: tuple[int, int], ratio: float, info: DistInfo
) -> Callable[[int, int], torch.Tensor]:
    """masks(k, n): the masks of this process's n images of global micro-batch k: drawn for the whole global batch
    from a generator keyed by (seed, k), this process taking rows rank, rank + world, ... (the sampler's
    interleaving), so they do not depend on the number of processes or on where a run was resumed."""

    def masks(k: int, n: int) -> torch.Tensor:
        key = hashlib.blake2b(f"fcmae:{seed}:{k}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        every = random_mask(global_batch, grid, ratio, generator=gen)
        return every[info.rank :: info.world_size][:n]

    return masks


def _train_source(cfg: PretrainConfig, train_ds: Any, info: DistInfo) -> tuple[Any, bool]:
    """The training images: decoded once into memory when they fit (data.cache auto/on), else a seeded per-image
    dataset for a DataLoader; and whether it is the per-image one."""
    d = cfg.data
    if d.cache not in ("auto", "on", "off"):
        raise ValueError(f"data.cache must be auto, on or off, not {d.cache!r}")
    if d.cache != "off":
        size = cache_size(d.img_size, "rrc", typical_short_side(train_ds))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        fits, figures = fits_in_memory(len(train_ds) * 3 * size * size, d.cache_memory_share, local)
        if fits:
            t = time.perf_counter()
            set_transform(train_ds, decode_transform(size))
            images = decode_all(train_ds, size, workers=d.num_workers)
            skipped = f"; skipped {images.skipped} unreadable" if images.skipped else ""
            log.info("decoded %d images at %dx%d into memory in %.1fs%s", len(images), size, size,
                     time.perf_counter() - t, skipped)  # fmt: skip
            return images, False
        if d.cache == "on":
            raise ValueError(f"data.cache on: the decoded images do not fit ({figures})")
        log.info("data: not cached in memory (%s); decoding per image with %d workers", figures, d.num_workers)
    tf = train_transform(d.img_size, crop="rrc", scale=d.scale, hflip=d.hflip, randaugment=False, re_prob=0.0,
                         mean=d.mean, std=d.std)  # fmt: skip
    set_transform(train_ds, tf)
    return SeededDataset(train_ds, cfg.seed), True


def _eval_images(cfg: PretrainConfig, val_ds: Any) -> torch.Tensor:
    """Up to `data.eval_images` val images, evenly spread, at the input size, normalised: (N, C, S, S)."""
    d = cfg.data
    n = max(min(d.eval_images, len(val_ds)), 1)
    picks = list(range(0, len(val_ds), max(len(val_ds) // n, 1)))[:n]
    set_transform(val_ds, decode_transform(d.img_size))
    images = decode_all(Subset(val_ds, picks), d.img_size)
    if len(images) == 0:
        raise ValueError(f"{d.name}: no readable val image to score the reconstructions on")
    return Normalise(d.mean, d.std)(images.images).contiguous()


def _check_config(cfg: PretrainConfig) -> None:
    """Values no run can use, refused before the data is read or the run folder is touched."""
    bad = []
    if not cfg.data.name:
        bad.append("no data: give --data (an image folder, cifar10, cifar100 or digits)")
    if cfg.epochs < 1:
        bad.append(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.budget_min is not None and not cfg.budget_min > 0:
        bad.append(f"budget_min must be > 0 minutes, got {cfg.budget_min}")
    if cfg.batch_size < 1 or cfg.accum_steps < 1:
        bad.append(f"batch_size and accum_steps must be >= 1, got {cfg.batch_size} and {cfg.accum_steps}")
    if not 0 < cfg.fcmae.mask_ratio < 1:
        bad.append(f"mask ratio must be in (0, 1), got {cfg.fcmae.mask_ratio}")
    if cfg.data.img_size is not None and cfg.data.img_size < 1:
        bad.append(f"data.img_size must be >= 1, got {cfg.data.img_size}")
    if cfg.fcmae.decoder_depth < 0 or (cfg.fcmae.decoder_dim is not None and cfg.fcmae.decoder_dim < 1):
        bad.append("fcmae.decoder_depth must be >= 0 and fcmae.decoder_dim >= 1")
    if bad:
        raise ValueError("; ".join(bad))
    if cfg.tensorboard:
        require("tensorboard", what="--tensorboard true")
    encoder_config(cfg.model)  # a ConvNeXt, with options it takes


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.4f}")
    parts.append(f"lr {row['lr']:.3g}  {row['img_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s")
    if row.get("skipped_images"):
        parts.append(f"skipped {row['skipped_images']} unreadable images")
    return "  ".join(parts)

"""`pretrain(cfg)`: FCMAE pre-training of one run end to end on the run engine (`convnext.engine`), as
`convnext train`: the run folder and its lock, config.json, metrics.csv/.jsonl, atomic checkpoints and exact resume,
torchrun DDP, the time budget, the in-memory image cache and the CPU fast path; plus reconstructions/epoch_NNN.png,
a picture of masked inputs and their reconstructions after every epoch.

Every check runs before the first step: the config (mask ratio, sizes), the run folder, the data (no images, images
smaller than the masking patch, an input size the patches do not tile), and the weights to resume from.

The masks are a function of (seed, optimizer step, micro-batch) and of each image's place in the global batch,
like the cached crops: a resumed run and a run on N processes mask the same images the same way as one process.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

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
from convnext.engine.distributed import (
    DistInfo,
    ResumableSampler,
    all_reduce_sum,
    check_same,
    data_digest,
    joined,
    per_rank_batch,
    wrap,
)
from convnext.engine.loop import autocast, cuda_switches, resolve_amp
from convnext.engine.optim import build_optimizer, scaled_lr
from convnext.engine.run import RunFolder
from convnext.engine.trainer import Loop, LrShape, Trainer, restore_weights, schedule
from convnext.extras import require
from convnext.fast import keep_freed_memory, kernels
from convnext.fast import usable as fast_usable
from convnext.pretrain.config import PretrainConfig, encoder_config, pick_input, total_stride
from convnext.pretrain.fcmae import FCMAE, FCMAEConfig, default_decoder_dim, mask_grid, random_mask, visible_count
from convnext.pretrain.report import save_reconstructions
from convnext.registry import create_model

log = logging.getLogger("convnext.pretrain")

PICTURES = "reconstructions"  # the run folder's subfolder of per-epoch PNGs
RUN_FILES = ("config.json", "last.pt", "metrics.csv", "metrics.jsonl", "results.json")
COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "img_per_s", "epoch_time_s", "elapsed_s", "skipped_images")
SHOWN = 8  # images per picture


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train `cfg` (one process, or one rank of a torchrun job) and return the final metrics:
    {"loss" (val), "train_loss", "epochs", "steps", "img_per_s", "img_size", "patch_px", "grid", "run_dir", ...}."""
    cfg = copy.deepcopy(cfg)  # the run resolves fields (size, stem, lr); the caller's config stays as given
    with joined(cfg.device) as info, contextlib.ExitStack() as held:  # the lock is held until the run ends
        return _pretrain(cfg, info, held)


@dataclass
class FCMAETask:
    """The engine's task for FCMAE: the masked-reconstruction loss, its val loss on fixed masks, and a picture of
    reconstructions after every epoch."""

    cfg: PretrainConfig
    info: DistInfo
    masks: Callable[[int, int], torch.Tensor]
    eval_x: torch.Tensor
    eval_masks: torch.Tensor
    micro_batch: int
    run_dir: Path
    best_key: str | None = None
    columns: tuple[str, ...] = COLUMNS

    def loss(self, model: nn.Module, x: torch.Tensor, y: Any, index: int) -> torch.Tensor:
        x = x.to(self.info.device, non_blocking=True)
        with autocast(self.info.device, self.cfg.amp):
            loss, _, _ = model(x, self.masks(index, len(x)).to(self.info.device))
        return loss.float()

    def evaluate(self, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
        return {"val_loss": evaluate(model, self.eval_x, self.eval_masks, self.micro_batch, self.info, self.cfg.amp)}

    def summary(self, row: dict[str, Any]) -> str:
        return f"val loss {row['val_loss']:.4f}"

    def epoch_end(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        shown = torch.arange(0, len(self.eval_x), max(len(self.eval_x) // SHOWN, 1))[:SHOWN]  # over the classes
        pictures = self.run_dir / PICTURES / f"epoch_{int(rows[-1]['epoch']):03d}.png"
        d = self.cfg.data
        save_reconstructions(model, self.eval_x[shown], self.eval_masks[shown], d.mean, d.std, pictures)


def _pretrain(cfg: PretrainConfig, info: DistInfo, held: contextlib.ExitStack) -> dict[str, Any]:
    t_setup = time.perf_counter()
    if not info.is_main:
        log.setLevel(logging.WARNING)
    if cfg.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    _check_config(cfg)
    cfg.amp = resolve_amp(cfg.amp, info.device)  # "auto" -> bf16 / fp16 / none, saved resolved
    if cuda_switches(info.device) and info.is_main:
        log.info("device %s x %d: amp %s, tf32 on, cudnn.benchmark on", info.device, info.world_size, cfg.amp)
    run = RunFolder(cfg.resume or cfg.output, resume=bool(cfg.resume), overwrite=cfg.overwrite, files=RUN_FILES,
                    subfolders=(PICTURES,))  # fmt: skip
    cfg.output, cfg.resume = str(run.path), cfg.resume if run.resume else None  # stopped before a checkpoint: anew

    # ---- data, then what it decides (input size, stem), all checked before any work
    d = cfg.data
    common = dict(data_dir=d.data_dir, val_split=d.val_split, skip_bad_images=d.skip_bad_images, download=d.download)
    train_ds, _ = build_dataset(d.name, "train", None, labels=False, **common)
    val_ds, _ = build_dataset(d.name, "val", None, labels=False, **common)
    check_same("training data (file names, sizes)", lambda: data_digest(train_ds), info,
               "give every process the same --data (on every machine)")  # fmt: skip
    stride, grid = _plan_input(cfg, train_ds)
    per_rank = per_rank_batch(cfg.batch_size, cfg.accum_steps, info, len(train_ds))
    train_images, per_image = _train_source(cfg, train_ds, info)
    eval_x = _eval_images(cfg, val_ds)

    # ---- model and optimizer (the same init on every rank)
    torch.manual_seed(cfg.seed)
    kwargs = cfg.model.build_kwargs() | {"num_classes": 0}
    init = {} if cfg.resume else {"pretrained": cfg.model.pretrained, "checkpoint": cfg.model.checkpoint}
    name = cfg.model.name if init.get("pretrained") else cfg.model.name.split(".")[0]  # a tag means its weights
    fast = cfg.fast and info.device.type == "cpu" and fast_usable()
    m = cfg.fcmae
    fcmae_cfg = FCMAEConfig(m.mask_ratio, m.decoder_dim, m.decoder_depth, m.norm_pix_loss)
    model = FCMAE(create_model(name, **init, **kwargs), fcmae_cfg, fast=fast)
    state = run.load_last() if cfg.resume else None
    if state is not None:
        restore_weights(model, state, str(run.last))
    if fast:
        keep_freed_memory()  # process-wide; this process is a training run
    model.to(info.device)
    o = cfg.optim
    o.lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, cfg.batch_size, o.base_batch)  # saved resolved
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, betas=o.betas, eps=o.eps, momentum=o.momentum,
                                nesterov=o.nesterov)  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

    sampler = ResumableSampler(train_images, info, cfg.seed, shuffle=True, drop_last=True)
    if per_image:
        train_loader: Any = DataLoader(
            train_images, batch_size=per_rank, sampler=sampler, drop_last=True, generator=torch.Generator(),
            collate_fn=collate_skip, num_workers=d.num_workers, pin_memory=d.pin_memory and info.device.type == "cuda",
        )  # fmt: skip
    else:
        augment = BatchAugment(d.img_size, crop="rrc", scale=d.scale, hflip=d.hflip, mean=d.mean, std=d.std)
        train_loader = CachedLoader(train_images, sampler, per_rank, augment=augment, drop_last=True, seed=cfg.seed,
                                    rank=info.rank, world=info.world_size)  # fmt: skip
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"batch {cfg.batch_size} with accum_steps {cfg.accum_steps} leaves no full step per epoch")
    torch.manual_seed(cfg.seed + info.rank)  # per-rank randomness (stochastic depth)

    loop = Loop(cfg.epochs, steps_per_epoch, per_rank, cfg.accum_steps, o.clip_grad, cfg.budget_min,
                cfg.ckpt_every_steps, cfg.eval_every, tensorboard=cfg.tensorboard)  # fmt: skip
    s = cfg.sched
    sched = schedule(loop, round(s.warmup_epochs * steps_per_epoch), round(s.step_epochs * steps_per_epoch))
    masks = _mask_stream(cfg.seed, per_rank * info.world_size, grid, m.mask_ratio, info)
    eval_masks = random_mask(len(eval_x), grid, m.mask_ratio, generator=torch.Generator().manual_seed(cfg.seed))
    task = FCMAETask(cfg, info, masks, eval_x, eval_masks, per_rank, run.path)
    trainer = Trainer(
        task, run, model=model, optimizer=optimizer, loader=train_loader, sampler=sampler, info=info, loop=loop,
        lr=LrShape(o.lr, s.name, s.min_lr, s.warmup_lr, s.gamma), sched=sched, config=cfg.to_dict(),
        forward=wrap(model, info), scaler=scaler, state=state,
        skipped_at_setup=0 if per_image else train_images.skipped,
    )  # fmt: skip
    log.info(
        "pre-training %s (FCMAE: %dpx patches, a %dx%d grid, %.0f%% masked, decoder %d x %d) on %s (%d images, "
        "%d val) at %dpx for %d epochs x %d steps, batch %d (%d per process x %d processes x %d accumulation), "
        "lr %.3g, %s",
        cfg.model.name, stride, *grid, 100 * m.mask_ratio, m.decoder_depth, m.decoder_dim, d.name, len(train_ds),
        len(eval_x), d.img_size, cfg.epochs, steps_per_epoch, cfg.batch_size, per_rank, info.world_size,
        cfg.accum_steps, o.lr, info.device,
    )  # fmt: skip
    out = trainer.fit(held)
    row = out["row"]
    result = {
        "loss": row["val_loss"],
        "train_loss": row.get("train_loss"),
        "epochs": out["epochs"],
        "steps": out["steps"],
        "img_per_s": out["images"] / out["train_time"] if out["train_time"] else None,
        "img_size": d.img_size,
        "patch_px": stride,
        "grid": list(grid),
        "visible_patches": visible_count(grid, m.mask_ratio),
        "time_s": time.perf_counter() - out["t0"],
        "train_s": out["train_s"],
        "setup_s": out["t0"] - t_setup,
        "fast_path": "on" if fast else "not used" if not (cfg.fast and info.device.type == "cpu") else "off",
        "c_kernels": kernels.status() if fast else "not used",
        "run_dir": str(run.path),
    }
    if info.is_main:
        run.write_json("results.json", result)
    return result


def _plan_input(cfg: PretrainConfig, train_ds: Any) -> tuple[int, tuple[int, int]]:
    """Fix the input size, the stem and the decoder width from the data (recipe lines say why); return the masking
    patch (the encoder's total stride) and the mask grid, refusing images or sizes the patches cannot tile."""
    d = cfg.data
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
    grid = mask_grid(d.img_size, d.img_size, stride, cfg.fcmae.mask_ratio)  # raises when the patches do not tile
    if min(grid) < 4:
        log.warning("the mask grid is %dx%d (the paper's is 7x7): a coarse grid makes a weak task", *grid)
    for line in cfg.recipe:
        log.info("recipe: %s", line)
    return stride, grid


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

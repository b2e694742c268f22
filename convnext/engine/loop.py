"""One training epoch, for any job: plain functions with explicit arguments that return dicts.

A job hands in its loss of a batch; the loop owns the rest of a step (accumulation, DDP's no_sync, the finiteness
check, the scaler, clipping, the optimizer step, EMA, the lr), the progress bar and the epoch's sums.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from convnext.engine import interrupt
from convnext.engine.distributed import DistInfo, all_reduce_sum
from convnext.engine.optim import set_lr

log = logging.getLogger("convnext.train")

# the loss of a batch: (model, inputs, targets, micro-batch index over the run) -> float32 scalar, the batch's mean
BatchLoss = Callable[[nn.Module, Any, Any, int], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops; the last good checkpoint stays."""


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (CPU or CUDA), fp16 (CUDA), or nothing for amp="none"."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, not {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def resolve_amp(amp: str, device: torch.device) -> str:
    """ "auto" -> bf16 on a CUDA GPU that has it (Ampere and later), fp16 (with a GradScaler) on an older GPU,
    none on the CPU; any other value as given."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def loader_workers(requested: int | None, local_processes: int = 1) -> int:
    """Data-loading workers: `requested`, or (None) the machine's cores shared by the processes on it, at most 8."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"num_workers must be >= 0, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(min(8, cores // max(local_processes, 1) - 1), 0)


def cuda_switches(device: torch.device, tf32: bool = True, benchmark: bool = True) -> dict[str, bool]:
    """On a CUDA device: TF32 for float32 matmuls and convolutions, cudnn.benchmark (fixed input sizes pick their
    fastest kernels). Returns what is on ({} on the CPU, where neither exists)."""
    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
    return {"tf32": tf32, "cudnn_benchmark": benchmark}


def rate_text(rate: float) -> str:
    """Images a second as the progress lines print them: whole numbers, two figures under 10 (a detector on a CPU
    trains at ~0.3 img/s, which "0" would hide)."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    info: DistInfo,
    loss_fn: BatchLoss,
    lr_fn: Callable[[int], float],
    step: int,
    accum_steps: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    ema: nn.Module | None = None,
    on_step: Callable[[int, int, Callable[[], tuple[float, int]]], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    desc: str = "train",
    total: int | None = None,
    log_every_s: float = 60.0,
    carry: tuple[float, int] = (0.0, 0),
    check_every: int = 50,
) -> dict[str, Any]:
    """Train over `loader` (batches of (inputs, targets, n_skipped)); one optimizer step per `accum_steps` batches.

    `loss_fn(model, inputs, targets, index)` is the job's loss of a batch (`index` counts micro-batches over the
    run: FCMAE's masks); a batch with no targets (all its images unreadable) is skipped.
    `step` is the global optimizer step the epoch starts at; `lr_fn(step)` gives each step's lr. After each
    optimizer step `on_step(step, steps_this_epoch, loss_so_far)` runs (checkpointing; `loss_so_far()`, a
    collective, gives the epoch's (sum of per-image losses, images) over all processes); `should_stop(step)` (the
    same answer on every rank) ends the epoch early. `carry` is that pair from the part of this epoch trained before
    a resume, so a resumed epoch's loss covers the whole epoch.
    Off a terminal (no progress bar: nohup, SLURM, a pipe) a log line every `log_every_s` seconds says where it is.
    The loss stays on the device: whether it was ever non-finite is kept there too and read (one host sync, one
    all-reduce) every `check_every` optimizer steps, by `loss_so_far()` (so before every mid-epoch save) and at the
    epoch's end (before the trainer's save): a NaN raises NonFiniteLossError before any state holding it is saved.
    Returns {"loss", "loss_sum", "loss_images", "images", "img_per_s", "steps", "step", "skipped", "stopped", "lr",
    "time", "data_time"}; "images" and "img_per_s" count all processes; "data_time" is the seconds spent waiting
    for the next batch.
    """
    model.train()
    dev = next(iter(model.parameters()), torch.zeros(())).device
    # (sum of per-image losses, non-finite losses), on the device: read at check points only
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    first_bad = torch.full((), -1, dtype=torch.int64, device=dev)  # the first step with a non-finite loss, here
    seen, skipped, micro, steps, stopped, lr = 0, 0, 0, 0, False, lr_fn(step)
    start = time.perf_counter()
    bar = tqdm(loader, total=total, desc=desc, disable=True if not info.is_main else None, leave=False, unit="batch")
    optimizer.zero_grad(set_to_none=True)
    batches, data_time = iter(bar), 0.0
    quiet_bar, last_log = bar.disable, start

    def checked(extra: list[float]) -> torch.Tensor:
        """sums + `extra`, summed over processes; raises NonFiniteLossError when any process saw a bad loss."""
        total = all_reduce_sum(torch.cat([sums.cpu(), torch.tensor([seen, *extra], dtype=torch.float64)]), info)
        if total[1] > 0:
            at = int(first_bad)
            where = f"at optimizer step {at}" if at >= 0 else f"on another process by optimizer step {step}"
            raise NonFiniteLossError(f"loss is nan or inf {where} ({desc})")
        return total

    def loss_so_far() -> tuple[float, int]:
        total = checked([])
        return carry[0] + float(total[0]), carry[1] + int(total[2])

    while True:
        t_data = time.perf_counter()
        try:
            inputs, targets, n_bad = next(batches)
        except StopIteration:
            break
        data_time += time.perf_counter() - t_data  # waiting for data: decoding, augmenting, or a worker
        skipped += n_bad
        if len(targets) == 0:
            continue
        last_micro = (micro + 1) % accum_steps == 0
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss = loss_fn(model, inputs, targets, step * accum_steps + micro % accum_steps)
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        micro += 1
        value = loss.detach().double()
        bad = ~torch.isfinite(value)
        first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
        sums += torch.stack([value * len(targets), bad.double()])  # no host sync: no copy either way
        seen += len(targets)
        if not last_micro:
            continue
        lr = lr_fn(step)
        optimizer_step(model, optimizer, lr, scaler, clip_grad, ema)
        step += 1
        steps += 1
        if check_every and steps % check_every == 0:
            checked([])
        if info.is_main:
            rate = seen * info.world_size / max(time.perf_counter() - start, 1e-9)
            if quiet_bar and time.perf_counter() - last_log >= log_every_s:
                last_log = time.perf_counter()
                where = f"{steps}/{total // accum_steps}" if total else str(steps)
                log.info("%s  step %s  loss %.4f  lr %.3g  %s img/s", desc, where, loss.item(), lr, rate_text(rate))
            elif not quiet_bar and (steps % max(check_every, 1) == 0 or steps == 1):  # .item() waits for the GPU
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=rate_text(rate), refresh=False)
        interrupt.check()  # a Ctrl-C whose KeyboardInterrupt was swallowed (convnext/engine/interrupt.py)
        if on_step is not None:
            on_step(step, steps, loss_so_far)
        if should_stop is not None and should_stop(step):
            stopped = True
            break
    bar.close()
    elapsed = time.perf_counter() - start
    totals = checked([float(skipped)])
    n = int(totals[2])
    loss_total, loss_images = carry[0] + float(totals[0]), carry[1] + n
    return {
        "loss": loss_total / max(loss_images, 1),
        "loss_sum": loss_total,
        "loss_images": loss_images,
        "images": n,
        "img_per_s": n / max(elapsed, 1e-9),
        "steps": steps,
        "step": step,
        "skipped": int(totals[3]),
        "stopped": stopped,
        "lr": lr,
        "time": elapsed,
        "data_time": data_time,
    }


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    ema: nn.Module | None = None,
) -> None:
    """One update from the accumulated gradients: set the lr, unscale (fp16), clip, step, clear, update the EMA."""
    set_lr(optimizer, lr)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update_parameters(getattr(model, "module", model))

"""The trainer skeleton every job runs: resume, the one checkpoint payload, the budget clock, the epoch loop with its
evaluation, best copy, metrics rows and saves, and what an interrupted or diverged run leaves behind.

A job (classification, FCMAE pre-training, detection, segmentation) builds its model, optimizer, loader and
sampler, and hands the trainer a `Task`: its loss of a batch, its evaluation and the words for its metrics. What a
job gains here it gains for all: exact resume (mid-epoch, after SIGKILL), the budget's refits, accumulation, DDP
(`distributed.wrap`) or FSDP (`distributed.shard`: the model, optimizer and EMA stay sharded and are saved so, in
last.dcp/), autocast (the task's loss runs under `loop.autocast`), EMA, the save on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from convnext.engine import checkpoint as ckpt
from convnext.engine.budget import BudgetClock
from convnext.engine.distributed import (
    DistInfo,
    ResumableSampler,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    check_same_file,
    gathered,
    is_sharded,
)
from convnext.engine.loop import NonFiniteLossError, rate_text, train_one_epoch
from convnext.engine.optim import lr_at, shrink_schedule
from convnext.engine.report import MetricsLog
from convnext.engine.run import SHARDED_STATE, RunFolder

log = logging.getLogger("convnext.train")


class Task(Protocol):
    """What a job tells the trainer. `best_key`: the row key whose largest value makes best.pt (None: no best.pt);
    `columns`: metrics.csv's columns (metrics.jsonl keeps every key)."""

    best_key: str | None
    columns: Sequence[str]

    def loss(self, model: nn.Module, inputs: Any, targets: Any, index: int) -> torch.Tensor:
        """The float32 mean loss of one micro-batch (`index` counts micro-batches over the run)."""
        ...

    def evaluate(self, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
        """The validation metrics as row entries (the same on every rank)."""
        ...

    def summary(self, row: dict[str, Any]) -> str:
        """The metrics part of an epoch's log line."""
        ...

    def epoch_end(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        """Side outputs after an epoch's row is written, on the main process (curves, pictures)."""
        ...


@dataclass
class Loop:
    """The numbers of a run's loop. `micro_batch`: images per process per forward; `eval_every`: epochs between
    evaluations (0: only at the end); `max_steps`: cap on the schedule's optimizer steps."""

    epochs: int
    steps_per_epoch: int
    micro_batch: int
    accum_steps: int = 1
    clip_grad: float | None = None
    budget_min: float | None = None
    ckpt_every_steps: int = 0
    eval_every: int = 1
    max_steps: int | None = None
    tensorboard: bool = False
    early_stop: int = 0  # stop after this many evaluated epochs without a better best_key (not budgeted runs)


@dataclass
class LrShape:
    """The lr schedule's shape (`optim.lr_at`); its step counts are the trainer's schedule."""

    lr: float
    name: str = "cosine"
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    gamma: float = 0.1


def schedule(loop: Loop, warmup_steps: int, step_size: int = 1) -> dict[str, int]:
    """The resolved schedule (saved in every checkpoint): total, warmup and decay steps, steps per epoch."""
    total = loop.epochs * loop.steps_per_epoch
    if loop.max_steps:
        total = min(total, loop.max_steps)
    return {
        "total_steps": total,
        "warmup_steps": min(warmup_steps, total),
        "step_size": max(step_size, 1),
        "steps_per_epoch": loop.steps_per_epoch,
    }


def restore_weights(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """The resumed run's weights into `model`, with one clear error when they are another model's."""
    ckpt.check_compatible(model, state["model"], f"checkpoint {source}")
    model.load_state_dict(state["model"])


class Trainer:
    """Runs `task` over `loader` into `run`. `model` is the module whose state is saved (DDP/compile wrappers go in
    `forward`); `state` a checkpoint to resume from (its weights already in `model`, EMA built after them);
    `config` the resolved config saved in config.json and every checkpoint; `extra` more payload entries
    (the fast path's plan)."""

    def __init__(
        self,
        task: Task,
        run: RunFolder,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Any,
        sampler: ResumableSampler,
        info: DistInfo,
        loop: Loop,
        lr: LrShape,
        sched: dict[str, int],
        config: dict[str, Any],
        forward: nn.Module | None = None,
        ema: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        state: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        skipped_at_setup: int = 0,
    ):
        self.task, self.run, self.model, self.optimizer = task, run, model, optimizer
        self.loader, self.sampler, self.info, self.loop, self.lr = loader, sampler, info, loop, lr
        self.sched, self.config, self.forward = sched, config, forward if forward is not None else model
        self.ema, self.scaler, self.extra, self.skipped_at_setup = ema, scaler, extra or {}, skipped_at_setup
        self.epoch, self.epoch_step, self.step, self.best = 0, 0, 0, -math.inf
        self.stale = 0  # evaluated epochs since best_key last improved (early stopping)
        self.carry = (0.0, 0)  # the resumed epoch's loss so far: (sum of per-image losses, images)
        self.metrics: MetricsLog | None = None
        self.last_good: tuple | None = None  # (epoch, epoch_step, step, loss so far, rng) after the last step
        self.sharded = is_sharded(model)  # FSDP: model, optimizer and EMA are each rank's shards
        if state is not None:
            self._restore(state)

    # ---------------------------------------------------------------- checkpoints
    def _restore(self, state: dict[str, Any]) -> None:
        run_dir, spe = self.run.path, self.loop.steps_per_epoch
        if state.get("steps_per_epoch", spe) != spe:
            raise ValueError(
                f"{run_dir}: the run had {state['steps_per_epoch']} steps per epoch, now {spe}; "
                "resume with the same batch size and data"
            )
        if state.get("sharded") and not self.sharded:
            raise ValueError(f"{run_dir} was trained with --shard: resume it with --shard under torchrun")
        if self.sharded and not state.get("sharded"):
            raise ValueError(f"{run_dir} was trained without --shard: resume it without --shard")
        if self.sharded:  # the shards and the step they belong to (last.pt may be a step behind: it is written after)
            state = ckpt.load_sharded(run_dir / state["sharded"], self.model, self.optimizer, self.ema)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.loop.budget_min is not None:  # keep the schedule that was fitted to the budget
            self.sched.update(state["scheduler"])
        self.epoch, self.epoch_step, self.step = state["epoch"], state["epoch_step"], state["step"]
        self.best = state.get("best", -math.inf)
        self.stale = state.get("stale", 0)
        if self.epoch_step > 0 and state.get("epoch_loss"):
            self.carry = (float(state["epoch_loss"][0]), int(state["epoch_loss"][1]))
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        else:
            log.warning("resuming on %d processes, saved on %d: random streams restart", self.info.world_size,
                        len(rngs))  # fmt: skip
        log.info("resuming %s at epoch %d, step %d", run_dir, self.epoch, self.step)
        saved_epochs = state.get("config", {}).get("epochs", self.loop.epochs)
        if saved_epochs != self.loop.epochs and self.loop.budget_min is None:
            log.info(
                "the run had %d epochs, now %d: the lr schedule is the one for %d epochs from step %d on (the steps "
                "already trained keep the lr they had)", saved_epochs, self.loop.epochs, self.loop.epochs, self.step,
            )  # fmt: skip
        if self.epoch >= self.loop.epochs or self.step >= self.sched["total_steps"]:
            log.info("the run is already finished (%d steps)", self.step)

    def early_stopped(self) -> bool:
        """Whether `loop.early_stop` evaluated epochs passed without improvement (never for a budgeted run: it
        keeps its schedule)."""
        return bool(self.loop.early_stop) and self.loop.budget_min is None and self.stale >= self.loop.early_stop

    def weights(self) -> dict[str, Any]:
        """{"model", "ema"}: the full weights as state dicts (a sharded run's gathered on rank 0 from every rank's
        shards, {} elsewhere: call on every rank)."""
        if not self.sharded:
            return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None}
        ema = ckpt.full_state(self.ema) if self.ema is not None else None
        return {"model": ckpt.full_state(self.model), "ema": ema}

    def save(
        self,
        epoch: int,
        epoch_step: int,
        step: int,
        epoch_loss: list | None,
        rngs: list | None = None,
        weights: dict[str, Any] | None = None,
    ) -> None:
        """Write the one checkpoint payload of every job into last.pt (`rngs`: each process's RNG state at the step;
        `weights`: `self.weights()` when the caller has them). A sharded run first writes its resume state, each
        rank its shards of the model, optimizer and EMA with the same plain entries, into last.dcp/; its last.pt
        then holds the gathered full weights without optimizer state (for eval, predict, export). Call on every
        rank (one process: the main one)."""
        if rngs is None:
            rngs = all_gather_object(ckpt.rng_state(), self.info)
        entries = {
            "scheduler": dict(self.sched),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "epoch": epoch,
            "epoch_step": epoch_step,
            "step": step,
            "steps_per_epoch": self.loop.steps_per_epoch,
            "best": self.best,
            "stale": self.stale,
            "epoch_loss": epoch_loss,
            "config": self.config,
            "sharded": SHARDED_STATE if self.sharded else None,
            **self.extra,
        }
        if self.sharded:
            ckpt.save_sharded(self.run.path / SHARDED_STATE, self.model, self.optimizer, entries, self.info,
                              ema=self.ema)  # fmt: skip
        weights = weights if weights is not None else self.weights()
        if self.info.is_main:
            optimizer = None if self.sharded else self.optimizer.state_dict()
            self.run.save({**weights, "optimizer": optimizer, **entries})

    def evaluate(self) -> dict[str, Any]:
        """The task's evaluation of the model and its EMA (a sharded run's gathered on every rank for it)."""
        with gathered(self.model, self.ema):
            return self.task.evaluate(self.model, self.ema)

    # ---------------------------------------------------------------- the run
    def fit(self, held: contextlib.ExitStack) -> dict[str, Any]:
        """Claim the run folder (held by `held`), train to the end of the schedule or the budget, and return
        {"row": the last metrics row, "epochs", "steps", "images", "train_time", "train_s", "t0"}."""
        if self.info.is_main:
            self.run.claim(held)  # --overwrite: the old run goes only now that data and model are built
            self.run.write_json("config.json", self.config)
            self.metrics = MetricsLog(self.run.path, tensorboard=self.loop.tensorboard, columns=self.task.columns)
            if self.run.resume:
                self.metrics.truncate_after(self.epoch)  # rows of finished epochs stay; a half epoch's is redone
        try:
            self._check_shared()
            with self._saved_on_interrupt():
                out = self._epochs()
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e}: stopping; {diverged_note(self.run)}. Try a lower --optim.lr or --optim.clip_grad 1.0"
            ) from None
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if "eval" not in out["row"]:  # resumed a finished run, or eval_every skipped the end
            out["row"] |= self.evaluate()
        out["row"].pop("eval", None)
        return out

    def _check_shared(self) -> None:
        """One line when a rank does not see rank 0's run folder (`check_same_file`); an error for a sharded run,
        whose ranks each write their shards into it, on every rank before the first step."""
        seen = all_gather_object(check_same_file(self.run.path / "config.json", self.info), self.info)
        if self.sharded and not all(seen):
            ranks = ", ".join(str(r) for r, ok in enumerate(seen) if not ok)
            raise ValueError(f"--shard: every rank writes its shards into the run folder {self.run.path}, and rank(s) "
                             f"{ranks} see another one: put it on a filesystem every machine shares")  # fmt: skip

    def _epochs(self) -> dict[str, Any]:
        loop, sched, info = self.loop, self.sched, self.info
        planned = dict(sched)
        budget = BudgetClock(loop.budget_min * 60 if loop.budget_min is not None else None, planned["total_steps"],
                             self.step)  # fmt: skip
        trained = {"images": 0, "time": 0.0}

        def refit(s: int) -> None:
            """Shorten the schedule to the steps that fit in the budget at the speed measured so far."""
            total = int(broadcast_object(budget.total_steps(s), info))
            sched.update(shrink_schedule(planned, total))

        def should_stop(s: int) -> bool:
            if s >= sched["total_steps"]:
                return True
            return budget.seconds is not None and bool(
                all_reduce_sum(torch.tensor(float(budget.out_of_time())), info) > 0
            )

        def lr_fn(s: int) -> float:
            c = self.lr
            return lr_at(s, lr=c.lr, total_steps=sched["total_steps"], warmup_steps=sched["warmup_steps"],
                         name=c.name, min_lr=c.min_lr, warmup_lr=c.warmup_lr, step_size=sched["step_size"],
                         gamma=c.gamma)  # fmt: skip

        row: dict[str, Any] = {}
        epochs_run = self.epoch
        source = self.loader if hasattr(self.loader, "set_epoch") else getattr(self.loader, "dataset", None)
        for epoch in range(self.epoch, loop.epochs):
            if self.step >= sched["total_steps"] or self.early_stopped():
                break
            offset = self.epoch_step
            self.sampler.set_epoch(epoch, skip=offset * loop.micro_batch * loop.accum_steps)
            if hasattr(source, "set_epoch"):
                source.set_epoch(epoch)

            def on_step(s: int, n: int, loss_so_far: Callable, epoch: int = epoch, offset: int = offset) -> None:
                if budget.step_done(s):
                    refit(s)
                if not info.distributed:  # what a save on Ctrl-C or a failing image writes
                    self.last_good = (epoch, offset + n, s, loss_so_far, ckpt.rng_state())
                if loop.ckpt_every_steps and s % loop.ckpt_every_steps == 0 and offset + n < loop.steps_per_epoch:
                    self.save(epoch, offset + n, s, list(loss_so_far()))

            r = train_one_epoch(
                self.forward, self.loader, self.optimizer, info=info, loss_fn=self.task.loss, lr_fn=lr_fn,
                step=self.step, accum_steps=loop.accum_steps, scaler=self.scaler, clip_grad=loop.clip_grad,
                ema=self.ema, on_step=on_step, should_stop=should_stop, desc=f"epoch {epoch + 1}/{loop.epochs}",
                total=(loop.steps_per_epoch - offset) * loop.accum_steps, carry=self.carry,
            )  # fmt: skip
            self.carry = (0.0, 0)
            t_end = time.perf_counter()
            self.step = r["step"]
            trained["images"] += r["images"]
            trained["time"] += r["time"]
            done_epoch = offset + r["steps"] >= loop.steps_per_epoch
            spent = r["stopped"] and self.step < sched["total_steps"]  # the budget ran out before the schedule
            if spent:
                sched["total_steps"] = self.step  # the schedule ends here: a resume does not go on
            row = {
                "epoch": epoch + 1,
                "step": self.step,
                "lr": r["lr"],
                "train_loss": r["loss"],
                "img_per_s": r["img_per_s"],
                "epoch_time_s": r["time"],
                "skipped_images": r["skipped"] + self.skipped_at_setup,
                "data_wait_pct": 100.0 * r["data_time"] / max(r["time"], 1e-9),
            }
            if (loop.eval_every and (epoch + 1) % loop.eval_every == 0) or epoch + 1 == loop.epochs or r["stopped"]:
                row |= self.evaluate() | {"eval": True}
            row["elapsed_s"] = time.perf_counter() - budget.t0
            self.epoch_step = 0 if done_epoch else offset + r["steps"]
            self.epoch = epoch + 1 if done_epoch else epoch
            epochs_run = epoch + 1
            value = _number(row.get(self.task.best_key)) if self.task.best_key else -math.inf
            if not getattr(self.task, "best_larger", True):  # a loss: the smallest is the best
                value = -value if value != -math.inf else value
            improved = value > self.best
            if row.get("eval"):
                self.stale = 0 if improved else self.stale + 1
            self.best = max(self.best, value)
            if self.info.is_main:  # the row first: a run killed after the save below has it; one killed before
                self.metrics.append({k: v for k, v in row.items() if k != "eval"})  # redoes the epoch and its row
            partial = None if done_epoch else [r["loss_sum"], r["loss_images"]]
            weights = self.weights()
            self.save(self.epoch, self.epoch_step, self.step, partial, weights=weights)
            self.last_good = None
            if self.info.is_main:
                if improved:
                    self.run.keep_best({**weights, "config": self.config, "step": self.step, "epoch": self.epoch,
                                        "best": self.best})  # fmt: skip
                self.task.epoch_end(self.model, self.metrics.rows())
                log.info(self._line(row))
            budget.paused += time.perf_counter() - t_end
            if budget.seconds is not None and not r["stopped"]:
                refit(self.step)
            if spent:
                log.info("time budget of %.1f min spent after %d steps", loop.budget_min, self.step)
            if r["stopped"]:
                break
            if self.early_stopped():
                log.info("early stop after epoch %d: %s did not improve for %d evaluated epochs (best %.4g)",
                         epoch + 1, self.task.best_key, self.stale, abs(self.best))  # fmt: skip
                break
        return {"row": row, "epochs": epochs_run, "steps": self.step, "images": trained["images"],
                "train_time": trained["time"], "train_s": budget.clock(), "t0": budget.t0}  # fmt: skip

    @contextlib.contextmanager
    def _saved_on_interrupt(self) -> Iterator[None]:
        """A Ctrl-C or an error mid-epoch (a file that breaks) keeps the steps done: last.pt gets the last finished
        step, with the RNG state it had then, so --resume continues as if nothing happened (one process)."""
        try:
            yield
        except NonFiniteLossError:
            raise
        except BaseException:
            if self.last_good is not None and self.info.is_main:
                epoch, epoch_step, step, loss_so_far, rng = self.last_good
                self.save(epoch, epoch_step, step, list(loss_so_far()), rngs=[rng])
                log.warning("interrupted at step %d; saved %s (continue with --resume %s)", step, self.run.last,
                            self.run.path)  # fmt: skip
            raise

    def _line(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}/{self.loop.epochs}", f"train loss {row['train_loss']:.4f}"]
        if row.get("eval"):
            parts.append(self.task.summary(row))
        parts.append(f"lr {row['lr']:.3g}  {rate_text(row['img_per_s'])} img/s  {row['epoch_time_s']:.1f}s")
        if row.get("skipped_images"):
            parts.append(f"skipped {row['skipped_images']} unreadable images")
        return "  ".join(p for p in parts if p)


def diverged_note(run: RunFolder) -> str:
    """What a diverged run leaves: last.pt was saved before the loss went non-finite, but its weights may already
    have blown up (the loss lags the weights), so say how large they are; best.pt is the last scored epoch's."""
    last, best = run.last, run.best
    if not last.exists():
        return "no checkpoint was written yet"
    state = ckpt.load(last)
    weights = [t for t in state["model"].values() if t.is_floating_point()]
    finite = all(bool(torch.isfinite(t).all()) for t in weights)
    size = max((float(t.abs().max()) for t in weights if t.numel()), default=0.0) if finite else float("inf")
    step = state.get("step", "?")
    note = f"{last} holds step {step}'s weights (largest |w| {size:.3g}; they may already have diverged)"
    return note + (f"; {best} holds the best scored epoch" if best.exists() else "; no epoch was scored yet")


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else -math.inf

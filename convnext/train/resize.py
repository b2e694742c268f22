"""Progressive resizing (FFCV's low-resolution start): the first part of a run trains on smaller images, which
cost less per step, so a time budget buys more steps; the size grows linearly to the full one.

`size_at` is the training size at a step; `StepCosts` measures what a step costs at each size as the run goes,
and `steps_in_budget` turns that into the number of steps the rest of a time budget holds, for the schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def size_at(step: int, total: int, full: int, low: int, until: float, quantum: int) -> int:
    """The training size at optimizer step `step` of `total`: `low` at the start, growing linearly to `full` at
    `until` x total steps, rounded down to a multiple of `quantum` (and never under it); `full` when `low` is 0."""
    if low <= 0 or low >= full:
        return full
    progress = step / max(until * total, 1.0)
    if progress >= 1.0:
        return full
    size = low + (full - low) * progress
    return min(full, max(quantum, int(size // quantum) * quantum))


def sizes(full: int, low: int, quantum: int) -> list[int]:
    """Every size `size_at` can give, smallest first."""
    if low <= 0 or low >= full:
        return [full]
    first = max(quantum, low // quantum * quantum)
    return sorted({*range(first, full, quantum), full})


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """A (B, C, H, W) batch resized to size x size, channels-last: by averaging k x k pixels where the side shrinks
    k-fold (3x faster than the antialiased bilinear filter), else bilinear with antialiasing."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h == w and h % size == 0:
        out = F.avg_pool2d(x, h // size)
    else:
        out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


class StepCosts:
    """Seconds per optimizer step at each training size, measured as the run goes; `guesses` (e.g. a forward and
    backward timed before the run) give the ratios between sizes not yet measured."""

    def __init__(self, guesses: dict[int, float] | None = None) -> None:
        self.guesses = dict(guesses or {})
        self.seconds: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, size: int, seconds: float) -> None:
        self.seconds[size] = self.seconds.get(size, 0.0) + seconds
        self.counts[size] = self.counts.get(size, 0) + 1

    def cost(self, size: int) -> float:
        """Mean seconds of a step at `size`; a size not yet run scales the nearest measured one by the guesses'
        ratio, or without guesses by (size ratio)^1.5 (between per-pixel and fixed costs: 16 -> 32 px cost
        1.9-3x for the quarter atto on a 2-core Xeon). 1.0 when nothing is known."""
        if size in self.counts:
            return self.seconds[size] / self.counts[size]
        if not self.counts:
            return self.guesses.get(size, 1.0) if len(self.guesses) > 1 else 1.0
        near = min(self.counts, key=lambda s: abs(s - size))
        if size in self.guesses and near in self.guesses:
            return self.cost(near) * self.guesses[size] / self.guesses[near]
        return self.cost(near) * (size / near) ** 1.5


def seconds_per_step(model: nn.Module, shape: tuple[int, ...], runs: int = 3) -> float:
    """The median seconds of a training forward and backward of `model` on a random batch of `shape` (after one
    untimed run), leaving the model's weights, gradients and the random streams as they were."""
    times = []
    with torch.random.fork_rng(devices=[]):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        for i in range(runs + 1):
            t = time.perf_counter()
            model(x).float().sum().backward()
            if i:
                times.append(time.perf_counter() - t)
    for p in model.parameters():
        p.grad = None
    return sorted(times)[len(times) // 2]


def steps_in_budget(
    done: dict[int, int],
    step: int,
    most: int,
    seconds_left: float,
    seconds_spent: float,
    costs: StepCosts,
    size_fn: Callable[[int, int], int],
) -> int:
    """The total step count T (at most `most`) whose remaining steps `step`..T-1, at the sizes `size_fn(i, T)`
    gives, fit in `seconds_left`, with the step costs' ratios from `costs` and their scale from the steps `done`
    (size -> count) having taken `seconds_spent`."""
    spent_units = sum(n * costs.cost(s) for s, n in done.items())
    if spent_units <= 0 or seconds_spent <= 0:
        return most
    units_left = seconds_left * spent_units / seconds_spent

    def units(total: int) -> float:  # sizes change at a few steps only: sum the cost of each constant run
        bounds = [*_change_points(step, total, size_fn), total]
        return sum(costs.cost(size_fn(a, total)) * (b - a) for a, b in zip(bounds, bounds[1:]))

    lo, hi = step + 1, max(most, step + 1)
    if units(hi) <= units_left:
        return hi
    while lo < hi:  # the largest total whose remaining steps fit (units grow with the total)
        mid = (lo + hi + 1) // 2
        if units(mid) <= units_left:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _change_points(step: int, total: int, size_fn: Callable[[int, int], int]) -> list[int]:
    """The steps in step..total-1 where size_fn(., total) differs from the step before (and `step` itself)."""
    points, last = [step], size_fn(step, total)
    while step < total and size_fn(total - 1, total) != last:
        a, b = points[-1], total - 1  # size_fn is non-decreasing in the step: the next change by bisection
        while a < b:
            m = (a + b) // 2
            if size_fn(m, total) > last:
                b = m
            else:
                a = m + 1
        points.append(a)
        last = size_fn(a, total)
    return points

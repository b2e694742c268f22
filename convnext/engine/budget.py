"""The time budget of a run (`--budget-min`): a clock that counts training steps only (not evaluation and the saves
at epoch ends), and the number of steps the budget buys at the speed measured so far, to which the lr schedule is
fitted. Shared by `convnext train` and `convnext pretrain`.

The speed is measured from the end of the warm-up steps on (the first steps build kernels, plans and caches and can
take seconds: counted in, they made a 10-minute FCMAE run end its schedule at 7.5 minutes and idle at lr 0), and
the fit is redone 10, 30, 90, ... steps in and at every epoch end, so a long first epoch is not planned on the
speed of its first ten steps.
"""

from __future__ import annotations

import time

WARMUP_STEPS = 3  # steps after the start (or the resume) that the speed leaves out
FIRST_FIT = 10  # the first refit, then x3


class BudgetClock:
    """Training seconds since the run (re)started, and the steps `seconds` of them buy; `seconds` None: no budget."""

    def __init__(self, seconds: float | None, planned_total: int, step0: int):
        self.seconds, self.planned_total, self.step0 = seconds, planned_total, step0
        self.t0 = time.perf_counter()
        self.paused = 0.0  # evaluation and checkpoints at epoch ends: add to it, they do not count
        self._mark: tuple[int, float] | None = None  # (step, clock) at the end of the warm-up
        self._next_fit = FIRST_FIT

    def clock(self) -> float:
        """Seconds of training so far."""
        return time.perf_counter() - self.t0 - self.paused

    def out_of_time(self) -> bool:
        return self.seconds is not None and self.clock() >= self.seconds

    def step_done(self, step: int) -> bool:
        """Record that `step` (the global optimizer step) is done; True when the schedule should be refitted now."""
        n = step - self.step0
        if n == WARMUP_STEPS:
            self._mark = (step, self.clock())
        if self.seconds is None or n < self._next_fit:
            return False
        self._next_fit *= 3
        return True

    def total_steps(self, step: int) -> int:
        """The run's total steps: `step` done plus the seconds left at the speed since the warm-up, never more than
        planned, never fewer than one more."""
        assert self.seconds is not None, "no budget to fit"
        now = self.clock()
        if self._mark is not None and step > self._mark[0]:
            per_step = (now - self._mark[1]) / (step - self._mark[0])
        else:
            per_step = now / max(step - self.step0, 1)
        left = int(max(self.seconds - now, 0.0) / max(per_step, 1e-9))
        return min(self.planned_total, max(step + left, step + 1))

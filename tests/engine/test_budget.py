"""The budget clock: the speed it plans with leaves out the warm-up steps, and the refits come 10, 30, 90 steps in."""

from convnext.engine import budget as budget_mod
from convnext.engine.budget import BudgetClock


def test_the_speed_leaves_out_the_warm_up_and_refits_come_geometrically(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: now[0])
    clock = BudgetClock(100.0, planned_total=1000, step0=0)
    refits = []
    for step in range(1, 100):
        now[0] += 5.0 if step <= 3 else 1.0  # three slow first steps (kernels, plans), then 1 s a step
        if clock.step_done(step):
            refits.append(step)
        if step == 10:
            # 22 s spent, 78 s left at 1 s a step: 88 steps; the mean speed with the warm-up in (2.2 s) gave 45
            assert clock.total_steps(10) == 88
    assert refits == [10, 30, 90]
    assert clock.total_steps(99) == 99 + 1  # out of time: one more step, never fewer
    clock.paused += 50.0  # evaluation at an epoch end: not counted
    assert clock.clock() == 15.0 + 96.0 - 50.0 and not clock.out_of_time()


def test_no_budget_never_refits_and_never_runs_out():
    clock = BudgetClock(None, planned_total=10, step0=0)
    assert not any(clock.step_done(s) for s in range(1, 50)) and not clock.out_of_time()


def test_the_schedule_never_grows_past_the_plan(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: now[0])
    clock = BudgetClock(1e6, planned_total=40, step0=5)  # resumed at step 5, a budget far larger than the plan
    for step in range(6, 20):
        now[0] += 1.0
        clock.step_done(step)
    assert clock.total_steps(19) == 40

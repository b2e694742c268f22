"""Progressive resizing: the size schedule, the budget's step count with sizes that cost differently, and a run
that trains small first and evaluates at full size."""

from __future__ import annotations

import pytest

from convnext.train import fit
from convnext.train.checkpoint import load
from convnext.train.resize import StepCosts, size_at, sizes, steps_in_budget
from convnext.train.runs import build_model


def test_size_grows_from_low_to_full_in_whole_quanta():
    got = [size_at(s, 100, 32, 16, 0.5, 8) for s in range(100)]
    assert got[0] == 16 and got[24] == 16 and got[25] == 24 and got[49] == 24 and got[50:] == [32] * 50
    assert sorted(set(got)) == sizes(32, 16, 8) == [16, 24, 32]
    assert size_at(0, 100, 32, 0, 0.5, 8) == 32 and sizes(32, 0, 8) == [32]  # off
    assert sizes(64, 20, 16) == [16, 32, 48, 64] and size_at(0, 10, 64, 20, 1.0, 16) == 16


def test_steps_in_budget_with_one_size_is_elapsed_time_per_step():
    costs = StepCosts()
    for _ in range(10):
        costs.add(32, 0.5)
    # 10 steps took 5 s; 20 s left hold 40 more steps
    total = steps_in_budget({32: 10}, 10, 1000, 20.0, 5.0, costs, lambda s, t: 32)
    assert total == 50
    assert steps_in_budget({32: 10}, 10, 30, 20.0, 5.0, costs, lambda s, t: 32) == 30  # capped at the plan


@pytest.mark.parametrize("left", [3.0, 40.0, 400.0])
def test_steps_in_budget_counts_cheap_small_steps(left):
    costs = StepCosts()
    for size, seconds in ((16, 0.1), (24, 0.2), (32, 0.4)):
        costs.add(size, seconds)

    def size_fn(s: int, t: int) -> int:
        return size_at(s, t, 32, 16, 0.5, 8)

    def seconds(step: int, total: int) -> float:  # the remaining steps' time, summed step by step
        return sum(costs.cost(size_fn(i, total)) for i in range(step, total))

    step = 20
    total = steps_in_budget({16: 20}, step, 100_000, left, 2.0, costs, size_fn)  # 20 steps at 0.1 s = 2 s
    assert seconds(step, total) <= left + 1e-9 < seconds(step, total + 1)


def test_unmeasured_size_is_guessed_from_the_nearest():
    costs = StepCosts()
    assert costs.cost(32) == 1.0
    costs.add(16, 0.1)
    assert costs.cost(16) == pytest.approx(0.1) and 0.1 < costs.cost(32) < 0.4  # between per-step and per-pixel


def _sizes_seen(cfg) -> tuple[dict, list[tuple[bool, int]]]:
    """fit(cfg) on a model whose stem notes (training?, input size) of every batch it is given."""
    model = build_model(cfg.model, 3, init_weights=True)
    seen: list[tuple[bool, int]] = []
    model.stem.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    return fit(cfg, model), seen


def test_run_trains_small_first_and_evaluates_at_full_size(image_folder, tiny_config, tmp_path):
    common = {"epochs": 2, "data.img_size": 32, "data.low_res": 16, "data.low_res_until": 0.5, "fast": False}
    result, seen = _sizes_seen(tiny_config(image_folder, tmp_path / "run", **common))
    train = [s for training, s in seen if training]
    assert train[0] == 16 and train[-1] == 32 and train == sorted(train)
    assert {s for training, s in seen if not training} == {32}  # evaluation at the full size
    assert result["n"] == 21


def test_with_a_budget_the_size_never_goes_back_down(image_folder, tiny_config, tmp_path):
    """The budget re-fits the total steps as the run goes, which moves the ramp's end; the size still only grows."""
    common = {"epochs": 60, "budget_min": 0.1, "data.img_size": 32, "data.low_res": 16, "fast": False}
    _, seen = _sizes_seen(tiny_config(image_folder, tmp_path / "run", **common))
    timed, train = [s for training, s in seen if training][:8], [s for training, s in seen if training][8:]
    assert timed == [16] * 4 + [32] * 4  # before the clock starts: one untimed and 3 timed steps at each size
    assert train == sorted(train) and train[0] == 16 and train[-1] == 32


def test_fast_path_plans_every_training_size(image_folder, tiny_config, tmp_path):
    cfg = tiny_config(image_folder, tmp_path / "run", **{"epochs": 1, "data.img_size": 32, "data.low_res": 1})
    fit(cfg)  # sizes are multiples of the network's stride (16 px with a 2x2 stem): 16 and 32 px
    rows = {row[1] for row in load(tmp_path / "run" / "last.pt")["plan"]}  # batch x H x W of each 1x1 product
    assert 6 * 16 * 16 in rows and 6 * 8 * 8 in rows and 6 * 4 * 4 in rows  # stage 1 (2x2 stem) at 32, 16 px
    assert 6 * 12 * 12 not in rows  # no 24 px: its third stage's 3x3 grid would not halve


def test_bad_progressive_settings_are_refused(image_folder, tiny_config, tmp_path):
    with pytest.raises(ValueError, match="data.low_res_until"):
        fit(tiny_config(image_folder, tmp_path / "run", **{"data.low_res": 8, "data.low_res_until": 0.0}))
    assert not (tmp_path / "run").exists()

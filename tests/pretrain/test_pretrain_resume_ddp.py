"""`convnext pretrain` (FCMAE) at 2 gloo processes, torchrun and both ranks SIGKILLed at once right after a save in
the middle of epoch 2, then --resume on 2 processes: the weights, AdamW's state and the epoch rows end bit for bit
where the uninterrupted 2-process run's do. Stochastic depth is on, so each rank's random stream has to come back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from convnext.engine.checkpoint import load

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("killed_run", ROOT / "tests" / "engine" / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)

STEPS = 6  # 24 training images, 8 a step (4 a process), 2 epochs
DIE_AT = 4  # epoch 2, step 1 of 3


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_exactly(folder, tmp_path, tiny_args):
    args = ["pretrain", "--data", str(folder), "--epochs", "2", "--ckpt_every_steps", "1", "--model.drop_path_rate",
            "0.2", *tiny_args]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    # the uninterrupted run, then the killed one, on the same 2 processes
    killed_run.ran(
        killed_run.run2([*args, "--output", str(full)], [*args, "--output", str(cut)], die_at=DIE_AT), DIE_AT
    )
    state = load(cut / "last.pt")
    assert (state["epoch"], state["epoch_step"], state["step"]) == (1, 1, DIE_AT), "not killed mid-epoch 2"
    assert len(state["rng"]) == 2  # both ranks' random states
    killed_run.ran(killed_run.run2(["pretrain", "--resume", str(cut)]))
    a, b = load(full / "last.pt"), load(cut / "last.pt")
    assert a["step"] == b["step"] == STEPS
    assert a["optimizer"]["state"], "AdamW's moments are compared"
    for key in ("model", "optimizer", "epoch_loss", "best"):
        killed_run.same(a[key], b[key], key)
    # each rank's torch stream (stochastic depth draws from it) ends where it did; Python's and NumPy's streams are
    # seeded from the OS in every process and never drawn from, so they differ between any two runs
    killed_run.same([r["torch"] for r in a["rng"]], [r["torch"] for r in b["rng"]], "rng")
    rows_a, rows_b = ((d / "metrics.csv").read_text().splitlines() for d in (full, cut))
    assert len(rows_a) == 3 and [r.split(",")[:5] for r in rows_a] == [r.split(",")[:5] for r in rows_b]

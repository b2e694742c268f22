"""Exact resume: a run SIGKILLed mid-epoch and continued with --resume ends with the same weights, EMA and
optimizer state as a run that was never interrupted (with stochastic depth, Mixup/CutMix, RandAugment and
random erasing all on, so every random stream has to be restored)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from convnext.engine.checkpoint import load
from convnext.fast import plan_from_rows


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(image_folder, tmp_path, run_cli, tiny_args):
    args = [
        "train", "--data", str(image_folder), "--epochs", "2", "--batch-size", "6", *tiny_args,
        "--model.drop_path_rate", "0.2", "--data.mixup", "0.8", "--data.cutmix", "1.0", "--data.randaugment", "true",
        "--data.re_prob", "0.25", "--data.hflip", "0.5", "--ema", "true", "--ema_decay", "0.9",
        "--ckpt_every_steps", "1", "--threads", "2",  # 2 threads: every reduction has a fixed order
        "--fast_plan", "default",  # both runs make the same 1x1 products (timed, near-ties flip on a busy machine)
    ]  # fmt: skip
    full = tmp_path / "full"
    r = run_cli(*args, "--output", str(full))
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "convnext", *args, "--output", str(killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load(killed / "last.pt")
    assert proc.returncode == -signal.SIGKILL
    assert state["epoch"] == 0 and 0 < state["epoch_step"] < state["steps_per_epoch"], "not killed mid-epoch"

    r = run_cli("train", "--resume", str(killed))
    assert r.returncode == 0, r.stderr
    a, b = load(full / "last.pt"), load(killed / "last.pt")
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key} {name} differs after resume"
    assert a["plan"] is None and b["plan"] is None  # fast_plan default: no timing, the same products in both runs
    opt_a, opt_b = a["optimizer"], b["optimizer"]  # the auto recipe's Muon + AdamW: {"muon": ..., "adamw": ...}
    assert set(opt_a) == {"muon", "adamw"}
    for part in ("muon", "adamw"):
        states = opt_a[part]["state"]
        assert states and states.keys() == opt_b[part]["state"].keys()
        for i, s in states.items():
            for k, t in s.items():  # momentum_buffer (Muon); exp_avg, exp_avg_sq, step (AdamW)
                assert torch.equal(t, opt_b[part]["state"][i][k]), f"optimizer {part} {i} {k} differs after resume"
    rows_a = (full / "metrics.csv").read_text().splitlines()
    rows_b = (killed / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 3
    # epoch 1's train loss covers the whole epoch, the steps before the kill included (written to 6 digits)
    assert float(rows_b[1].split(",")[3]) == pytest.approx(float(rows_a[1].split(",")[3]), rel=2e-6)
    # epoch 2 (the one after the resume) evaluates to the same numbers
    assert rows_a[2].split(",")[4:7] == rows_b[2].split(",")[4:7]


def test_resume_keeps_the_timed_plan_it_was_saved_with(image_folder, tmp_path, run_cli, tiny_args):
    """A resumed run takes the 1x1 products its checkpoint names instead of timing them again: the plan in last.pt
    is set to the opposite of every timed choice, and after the resume it is still that plan."""
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--batch-size", "6", *tiny_args, "--output", str(out)]
    r = run_cli(*args, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    state = load(out / "last.pt")
    assert state["plan"], "the default fast_plan times the products"
    flipped = [[*row[:5], not row[5]] for row in state["plan"]]
    torch.save({**state, "plan": flipped}, out / "last.pt")
    r = run_cli("train", "--resume", str(out), "--epochs", "2")
    assert r.returncode == 0, r.stderr
    after = load(out / "last.pt")
    assert after["step"] > state["step"]
    assert plan_from_rows(after["plan"]) == plan_from_rows(flipped)


def test_ctrl_c_is_one_line_saying_how_to_resume(image_folder, tmp_path, tiny_args):
    """SIGINT (Ctrl-C) mid-run: exit code 130 and one line naming the run folder and the --resume command."""
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--epochs", "500", "--batch-size", "6", *tiny_args,
            "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(  # -X faulthandler: a run that hangs after Ctrl-C shows where (SIGABRT below)
        [sys.executable, "-X", "faulthandler", "-m", "convnext", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"no exit 60 s after Ctrl-C; where it was:\n{proc.communicate(timeout=30)[1][-4000:]}")
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.startswith("convnext train:")]
    assert lines == [f"convnext train: interrupted; {out} keeps its last checkpoint: continue with --resume {out}"]
    assert "Traceback" not in err

"""torchrun with 2 CPU processes (gloo) gives the same weights as 1 process with the same global batch, and its
evaluation counts every validation image exactly once (21 images: 11 on one rank, 10 on the other). The 2-process
run goes through tests/engine/test_collectives.py's guard: a collective handed a tensor on a device its group does
not serve fails it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import torch

from convnext.engine.checkpoint import load

_spec = importlib.util.spec_from_file_location(
    "collective_guard", Path(__file__).resolve().parents[1] / "engine" / "test_collectives.py"
)
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


def test_two_processes_match_one(image_folder, tmp_path, run_cli, tiny_args):
    # No Mixup/CutMix and no stochastic depth: they draw per batch / per process. Per-image augmentation stays on:
    # it is seeded by (seed, epoch, index), so both runs see the same pixels.
    args = [
        "train", "--preset", "demo", "--data", str(image_folder), "--epochs", "2", "--batch-size", "6",
        "--device", "cpu", *tiny_args,
        "--data.mixup", "0", "--data.cutmix", "0", "--model.drop_path_rate", "0", "--ema", "true",
        "--ema_decay", "0.9",
    ]  # fmt: skip
    one = tmp_path / "one"
    r = run_cli(*args, "--output", str(one))
    assert r.returncode == 0, r.stderr

    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARD_LOG": str(tmp_path / "guard")}
    r = subprocess.run(
        [*guard.guarded_cmd(2), *args, "--output", str(two)], env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-3000:]
    counts = guard.guard_counts(tmp_path / "guard")
    assert len(counts) == 2 and all(c.get("all_reduce", 0) >= 4 for c in counts), counts  # the guard saw them

    a, b = load(one / "last.pt"), load(two / "last.pt")
    assert a["step"] == b["step"] == 12
    assert len(b["rng"]) == 2  # one random state per rank
    for key in ("model", "ema"):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    res_a = json.loads((one / "results.json").read_text())
    res_b = json.loads((two / "results.json").read_text())
    assert res_a["n"] == res_b["n"] == 21
    assert abs(res_a["top1"] - res_b["top1"]) < 1e-6 or abs(res_a["loss"] - res_b["loss"]) < 1e-3

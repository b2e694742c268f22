"""torchrun with 2 CPU processes (gloo) pre-trains the same weights as 1 process with the same global batch: the
crops and the masks are functions of each image's place in the global batch, not of the process that holds it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import torch

from convnext.engine.checkpoint import load
from convnext.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("collective_guard", ROOT / "tests" / "engine" / "test_collectives.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


def test_two_processes_match_one(folder, tiny, tmp_path, tiny_args):
    one = tmp_path / "one"
    pretrain(tiny(folder, one))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GUARD_LOG": str(tmp_path / "guard")}
    args = ["pretrain", "--data", str(folder), "--output", str(two), "--epochs", "2", *tiny_args]
    r = subprocess.run([*guard.guarded_cmd(2), *args], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = guard.guard_counts(tmp_path / "guard")
    assert len(counts) == 2 and all(c.get("all_reduce", 0) >= 3 for c in counts), counts
    a, b = load(one / "last.pt"), load(two / "last.pt")
    assert a["step"] == b["step"] == 6 and len(b["rng"]) == 2
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    res_a, res_b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert abs(res_a["loss"] - res_b["loss"]) < 1e-4  # the val loss, its 8 images shared between the ranks

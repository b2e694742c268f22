"""The same `convnext train` command with the same seed gives the same bits on one machine: the first run times its
1x1 plan and keeps it in $CONVNEXT_CACHE/plans.json, the second reads it back (before the cache, each run timed
its own and near-ties made them end ~1e-7 apart)."""

from __future__ import annotations

import json

import torch

from convnext.engine.checkpoint import load


def test_two_fresh_runs_with_one_seed_end_with_equal_weights(image_folder, tmp_path, run_cli, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVNEXT_CACHE", str(cache))  # never the real ~/.cache/convnext (run_cli passes os.environ)
    args = [
        "train", "--data", str(image_folder), "--model", "convnext_atto", "--img-size", "32", "--epochs", "1",
        "--batch-size", "6", "--seed", "3", "--threads", "1", "--data.num_workers", "0", "--fast", "true",
        "--fast_plan", "timed",
    ]  # fmt: skip
    runs = [tmp_path / "a", tmp_path / "b"]
    logs = []
    for out in runs:
        r = run_cli(*args, "--output", str(out), timeout=300)
        assert r.returncode == 0, r.stderr
        logs.append(r.stderr)
        assert json.loads((out / "results.json").read_text())["fast_path"] == "on"
    assert "1x1 plan" in logs[0] and "timed now, kept in" in logs[0]
    assert f"kept in {cache / 'plans.json'}" in logs[1] and "timed now" not in logs[1]
    a, b = (load(out / "last.pt") for out in runs)
    assert a["plan"] and a["plan"] == b["plan"]  # the checkpoint records the plan that ran
    assert len(json.loads((cache / "plans.json").read_text())["plans"]) == 1
    assert a["model"].keys() == b["model"].keys()
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), f"{name} differs between two runs of one command"

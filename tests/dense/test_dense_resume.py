"""Detection and segmentation on the shared engine: a run SIGKILLed right after a checkpoint (mid-epoch, or at an
epoch's end after its evaluation) and continued with --resume ends with exactly the weights and optimizer state of
a run never interrupted; a time budget refits the schedule and stops the run with its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convnext.cli import main
from convnext.dense.train import train_segmentation

from .conftest import write_instance_folder, write_label_folder
from .test_dense_train import seg_config

# the killed run: the CLI in a child process that SIGKILLs itself right after writing the checkpoint of step DIE_AT
DIE_AFTER_SAVE = """
import os, signal, sys
from convnext.cli import main
from convnext.engine.run import RunFolder
save = RunFolder.save
def save_then_die(self, payload):
    save(self, payload)
    if payload["step"] == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
RunFolder.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def seg_args(data: Path) -> list[str]:
    return ["segment", "train", "--data.format", "folder", "--data.num_classes", "3", "--data.ignore_ids", "3",
            "--data.train_images", str(data / "images"), "--data.train_labels", str(data / "labels"),
            "--data.val_images", str(data / "images"), "--data.val_labels", str(data / "labels"),
            "--data.crop", "32,48", "--data.scale", "64,80", "--data.test_scale", "64,80", "--channels", "16",
            "--aux_channels", "8", "--backbone.drop_path_rate", "0.2", "--optim.warmup_steps", "2"]  # fmt: skip


def det_args(data: Path) -> list[str]:
    return ["detect", "train", "--data.root", str(data), "--data.test_split", "2", "--data.train_sizes", "64,80",
            "--data.test_size", "64", "--data.max_size", "96", "--fpn_channels", "32", "--model", "convnext_atto",
            "--backbone.drop_path_rate", "0.1", "--optim.warmup_steps", "1"]  # fmt: skip


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), f"{name} differs after resume"
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimizer state {i}.{k} differs after resume"


@pytest.mark.slow
@pytest.mark.parametrize(("task", "die_at", "where"), [
    ("segment", 1, "mid-epoch"), ("segment", 2, "epoch end"), ("detect", 2, "mid-epoch"),
])  # fmt: skip
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, task, die_at, where):
    if task == "segment":
        data = write_label_folder(tmp_path / "data")
        args = seg_args(data)
    else:
        data = write_instance_folder(tmp_path / "data", n=8)  # 6 train images: 3 steps an epoch
        args = det_args(data)
    args += ["--epochs", "2", "--batch-size", "2", "--run.num_workers", "0", "--run.ckpt_every_steps", "1",
             "--run.eval_every", "1", "--run.threads", "2"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "full")]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "DIE_AT": str(die_at)}
    proc = subprocess.run([sys.executable, "-c", DIE_AFTER_SAVE, *args, "--output", str(killed)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["step"] == die_at and (state["epoch_step"] == 0) == (where == "epoch end")

    assert main([task, "train", "--resume", str(killed)]) == 0
    full, resumed = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "full", killed))
    assert_same_state(full, resumed)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # the killed run's rows are redone, not doubled


def test_budget_refits_the_schedule_and_stops_with_metrics(tmp_path, caplog):
    data = write_label_folder(tmp_path / "seg")
    cfg = seg_config(data, tmp_path / "run", epochs=500, budget_min=0.03, eval_every=0)
    with caplog.at_level("INFO", logger="convnext.train"):
        result = train_segmentation(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 0 < result["steps"] < 1000 and 0.0 <= result["mIoU"] <= 1.0
    assert state["scheduler"]["total_steps"] == result["steps"]  # the schedule ends where the budget did
    assert "epoch 1/500" in caplog.text and "epoch 500/500" not in caplog.text
    assert main(["segment", "train", "--resume", str(tmp_path / "run")]) == 0  # a spent budget does not go on
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == result["steps"]

"""Detection and segmentation under torchrun: 2 CPU processes (gloo) end within float tolerance of 1 process at
the same global batch (2 processes x 2 images vs 1 process accumulating 2 micro-batches of 2), and their
evaluation scores every validation image once (its pooled shards score as one process would). The 2-process runs
go through the collective device guard (tests/engine/test_collectives.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from convnext.dense.train import (
    detection_datasets,
    evaluate_detection,
    evaluate_segmentation,
    load_dense_run,
    segmentation_datasets,
    train_detection,
    train_segmentation,
)
from convnext.engine.checkpoint import load

from .conftest import write_instance_folder, write_label_folder
from .test_dense_train import det_config, seg_config

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("collective_guard", ROOT / "tests" / "engine" / "test_collectives.py")
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


def _two_processes(task: str, cfg, tmp_path: Path) -> dict:
    config = tmp_path / "two.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARD_LOG": str(tmp_path / "guard")}
    r = subprocess.run([*guard.guarded_cmd(2), task, "train", "--config", str(config), "--device", "cpu"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    counts = guard.guard_counts(tmp_path / "guard")
    assert len(counts) == 2 and all(
        c.get("all_reduce", 0) >= 1 and c.get("gather", 0) + c.get("all_reduce", 0) >= 2 for c in counts
    ), counts
    return json.loads((Path(cfg.run.output) / "results.json").read_text())


def _same_weights(one: Path, two: Path, lr: float) -> None:
    """Equal within float tolerance, but for a few elements: where a gradient is zero in exact arithmetic (a bias
    ahead of a BatchNorm, which takes the per-channel shift out), the two runs' gradients are float noise (other
    sums' order) and AdamW turns noise into a step of about lr. So: at most 0.1% of the elements differ by more than
    the tolerance, and none by more than AdamW's largest move over the steps."""
    a, b = load(one / "last.pt"), load(two / "last.pt")
    assert a["step"] == b["step"] == 2 and len(b["rng"]) == 2
    off, total = 0, 0
    for name, t in a["model"].items():
        if not t.is_floating_point() or "running_" in name:  # DDP keeps rank 0's BatchNorm statistics
            continue
        diff = (b["model"][name] - t).abs()
        off += int((diff > 1e-5 + 1e-4 * t.abs()).sum())
        total += t.numel()
        assert float(diff.max()) <= 2.5 * lr, name
    assert off <= total // 1000, f"{off} of {total} weights differ"


@pytest.mark.slow
def test_segmentation_two_processes_match_one(tmp_path):
    root = write_label_folder(tmp_path / "seg", n=9)
    one = seg_config(root, tmp_path / "one", batch_size=4, accum_steps=2, max_steps=2, ckpt_every_steps=0)
    res_one = train_segmentation(one)
    saved = json.loads((tmp_path / "one" / "config.json").read_text())["run"]
    assert saved["amp"] == "none" and saved["num_workers"] == 0  # amp "auto" resolved for the CPU, and recorded
    two = seg_config(root, tmp_path / "two", batch_size=4, accum_steps=1, max_steps=2, ckpt_every_steps=0)
    res_two = _two_processes("segment", two, tmp_path)
    _same_weights(tmp_path / "one", tmp_path / "two", one.optim.lr)
    assert res_one["images"] == res_two["images"] == 9  # 5 on rank 0, 4 on rank 1
    # the pooled shards score as one process scoring every image with the same weights (BatchNorm's running
    # statistics are rank 0's under DDP, so the 1-process run's own scores differ a little)
    model, cfg = load_dense_run(tmp_path / "two", "last")
    alone = evaluate_segmentation(model, segmentation_datasets(cfg)[1], cfg, torch.device("cpu"))
    assert alone["images"] == 9 and alone["aAcc"] == res_two["aAcc"] and alone["mIoU"] == res_two["mIoU"]


@pytest.mark.slow
def test_detection_two_processes_match_one(tmp_path):
    root = write_instance_folder(tmp_path / "peds", n=7)
    one = det_config(root, tmp_path / "one")
    one.data.test_split = 3
    one.run.accum_steps, one.run.ckpt_every_steps = 2, 0
    res_one = train_detection(one)
    two = det_config(root, tmp_path / "two")
    two.data.test_split = 3
    two.run.ckpt_every_steps = 0
    res_two = _two_processes("detect", two, tmp_path)
    _same_weights(tmp_path / "one", tmp_path / "two", one.optim.lr)
    assert res_one["images"] == res_two["images"] == 3  # 2 on rank 0, 1 on rank 1
    model, cfg = load_dense_run(tmp_path / "two", "last")
    alone = evaluate_detection(model, detection_datasets(cfg)[1], torch.device("cpu"), cfg.masks)
    assert alone["images"] == 3 and alone["box_AP"] == res_two["box_AP"] and alone["mask_AP"] == res_two["mask_AP"]

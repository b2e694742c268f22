"""`convnext detect train` and `convnext segment train` at 2 gloo processes, torchrun and both ranks SIGKILLed at once
right after a mid-epoch save (detection in epoch 1, segmentation in epoch 2, after an evaluated epoch end), then
--resume on 2 processes: the weights (BatchNorm's running statistics included), AdamW's state, each rank's random
stream and the metrics rows end bit for bit where the uninterrupted 2-process run's do. Stochastic depth is on.

The five runs share three torchrun starts (most of a tiny run's time is Python starting): the two uninterrupted runs
and the killed detection run; the resumed detection run and the killed segmentation run; the resumed segmentation
run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from convnext.engine.checkpoint import load

from .conftest import write_instance_folder, write_label_folder
from .test_dense_resume import det_args, seg_args

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("killed_run", ROOT / "tests" / "engine" / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)

RUN = ["--epochs", "2", "--run.num_workers", "0", "--run.ckpt_every_steps", "1", "--run.threads", "1", "--device",
       "cpu"]  # fmt: skip
# (global batch, optimizer step after whose save the run is killed, eval_every): 2 steps an epoch, 4 in all; a
# segmentation process needs 2 images (the pooling branch's BatchNorm sees one value a channel per image); the
# detection run, killed in epoch 1, is scored at the end only
PLAN = {"detect": (2, 1, 0), "segment": (4, 3, 1)}
TIMES = ("img_per_s", "epoch_time_s", "elapsed_s", "data_wait_pct")  # the rows' wall-clock entries


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """{task: {"full": run folder, "cut": the killed and resumed run folder, "killed_at": (epoch, epoch_step, step)
    of the killed run's last.pt}}."""
    tmp = tmp_path_factory.mktemp("resume_ddp")
    data = {"detect": write_instance_folder(tmp / "peds", n=6), "segment": write_label_folder(tmp / "seg", n=8)}
    out: dict[str, dict] = {}
    cmd = {}
    for task, (batch, _, eval_every) in PLAN.items():
        args = det_args(data[task]) if task == "detect" else seg_args(data[task])
        out[task] = {"full": tmp / f"{task}_full", "cut": tmp / f"{task}_cut"}
        cmd[task] = [*args, *RUN, "--batch-size", str(batch), "--run.eval_every", str(eval_every)]
    full = [[*cmd[t], "--output", str(out[t]["full"])] for t in PLAN]
    at = {task: die_at for task, (_, die_at, _) in PLAN.items()}

    def killed_at(task: str) -> tuple[int, int, int]:
        state = load(out[task]["cut"] / "last.pt")
        return state["epoch"], state["epoch_step"], state["step"]

    r = killed_run.run2(*full, [*cmd["detect"], "--output", str(out["detect"]["cut"])], die_at=at["detect"])
    killed_run.ran(r, at["detect"])
    out["detect"]["killed_at"] = killed_at("detect")
    r = killed_run.run2(["detect", "train", "--resume", str(out["detect"]["cut"])],
                        [*cmd["segment"], "--output", str(out["segment"]["cut"])], die_at=at["segment"])  # fmt: skip
    killed_run.ran(r, at["segment"])
    out["segment"]["killed_at"] = killed_at("segment")
    killed_run.ran(killed_run.run2(["segment", "train", "--resume", str(out["segment"]["cut"])]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", list(PLAN))
def test_two_processes_killed_mid_epoch_resume_exactly(runs, task):
    full, cut = runs[task]["full"], runs[task]["cut"]
    die_at = PLAN[task][1]
    assert runs[task]["killed_at"] == ((die_at - 1) // 2, (die_at - 1) % 2 + 1, die_at), "not killed mid-epoch"
    a, b = load(full / "last.pt"), load(cut / "last.pt")
    assert a["step"] == b["step"] == 4 and len(b["rng"]) == 2
    assert a["optimizer"]["state"], "AdamW's moments are compared"
    assert any("running_mean" in k for k in a["model"]) == (task == "segment")  # UperNet's BatchNorm
    for key in ("model", "optimizer", "epoch_loss", "best", "epoch", "epoch_step"):
        killed_run.same(a[key], b[key], key)
    # each rank's torch stream ends where it did; Python's and NumPy's are seeded from the OS and never drawn from
    killed_run.same([r["torch"] for r in a["rng"]], [r["torch"] for r in b["rng"]], "rng")
    rows_a, rows_b = (
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, cut)
    )
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b] == [1, 2]  # the killed run's row is redone
    for ra, rb in zip(rows_a, rows_b):
        untimed = [{k: v for k, v in row.items() if k not in TIMES} for row in (ra, rb)]
        killed_run.same(*untimed, f"epoch {ra['epoch']}'s row")

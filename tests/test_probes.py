"""Issue 39's probes (a careless user, an attacker) that no other test file checks the way the user met them: a weight
tag given to train, values no run can use on the command line, an early Ctrl-C, a detection run killed after its
first epoch, the size of a detection run's best.pt.
Every other probe of the issue has its test beside the code it checks; docs/reliability.md lists them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convnext.cli import main
from convnext.dense.train import train_detection
from convnext.engine.checkpoint import load

from .dense.conftest import write_instance_folder
from .dense.test_dense_resume import DIE_AFTER_SAVE, assert_same_state, det_args
from .dense.test_dense_train import det_config
from .train.conftest import ROOT, write_image_folder
from .train.test_finetune import SHAPE, published  # noqa: F401  (a fixture: a published tag in the download cache)

KWARGS = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'  # a tiny 4-stage ConvNeXt


def train_argv(data: Path, out: Path, epochs: int = 1) -> list[str]:
    return ["train", "--preset", "demo", "--data", str(data), "--model.kwargs", KWARGS, "--img-size", "16",
            "--batch-size", "6", "--epochs", str(epochs), "--threads", "1", "--data.num_workers", "0", "--device",
            "cpu", "--output", str(out)]  # fmt: skip


@pytest.mark.parametrize("preset", [["--preset", "demo"], []], ids=["preset-demo", "auto-recipe"])
def test_a_weight_tag_given_to_train_starts_from_its_weights(published, preset, tmp_path, caplog):  # noqa: F811
    """Before: `--model convnext_atto.d2_in1k` trained random weights with no line, the same numbers as `--model
    convnext_atto`. Now the tag's weights are loaded and said, with a preset or the automatic recipe: after one short
    epoch its run is still near them, the bare name's run is not."""
    spec, net = published
    data, w = write_image_folder(tmp_path / "shapes", n=6), "stages.3.blocks.0.pwconv2.weight"
    common = [*preset, "--data", str(data), "--epochs", "1", "--batch-size", "6", "--threads", "1",
              "--data.num_workers", "0", "--device", "cpu"]  # fmt: skip
    distance = {}
    for name, model in (("tag", ["--model", spec.name]),
                        ("bare", ["--model", "convnext_atto", "--model.kwargs", json.dumps(SHAPE)])):  # fmt: skip
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main(["train", *common, *model, "--output", str(tmp_path / name)]) == 0
        said = f"weights: {spec.name}: the published weights" in caplog.text
        assert said == (name == "tag"), caplog.text
        distance[name] = (load(tmp_path / name / "last.pt")["model"][w] - net.state_dict()[w]).norm().item()
    assert distance["tag"] < 0.1 * distance["bare"], distance


@pytest.mark.parametrize(
    ("flags", "message", "left"),
    [
        (["--img-size", "7"], "data.img_size 7 is smaller than the model's total stride 16", []),
        (["--img-size", "100000"], "data.img_size 100000 at 6 images per step needs about", []),
        (["--model.drop_path_rate", "1.5"], r"model.drop_path_rate must be in [0, 1), got 1.5", []),
        (["--optim.lr", "1e9"], "loss is nan or inf at optimizer step", [".lock", "config.json"]),
    ],
    ids=["img-size-7", "img-size-100000", "drop-path-1.5", "lr-1e9"],
)
def test_a_value_no_run_can_use_is_one_line_and_the_same_command_then_trains(flags, message, left, tmp_path, capsys):
    """Before: a torch kernel-size error (--img-size 7), a bernoulli_ error (drop path 1.5), 30 GB allocated first
    (--img-size 100000), and each left a folder that "already holds a run". Now: one line, before any work where it
    can be checked up front (lr 1e9 cannot: it diverges), and the same command with a usable value trains."""
    data, out = write_image_folder(tmp_path / "shapes", n=6), tmp_path / "run"
    assert main([*train_argv(data, out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("convnext train: error: "), err
    assert message in err.splitlines()[-1], err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else []) == left
    assert main(train_argv(data, out)) == 0, capsys.readouterr().err
    assert (out / "last.pt").is_file() and (out / "results.json").is_file()


@pytest.mark.slow  # three fresh processes import torch
def test_an_early_ctrl_c_then_the_same_command_trains_or_names_resume(tmp_path):
    """Before: SIGINT early in a run left config.json and .lock but no last.pt, "--resume" said "nothing to resume"
    and the same command "already holds a run". Now a Ctrl-C as soon as the run folder is claimed: exit 130 in one
    line; then the same command starts the run again, or (when a step was finished and saved) names --resume,
    which finishes it."""
    data, out = write_image_folder(tmp_path / "shapes", n=24), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "convnext", *train_argv(data, out, epochs=3)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("convnext train: interrupted"), err

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if (out / "last.pt").is_file() and again.returncode == 2:  # a finished step was saved: the run is kept
        assert f"continue it with --resume {out}" in again.stderr.strip().splitlines()[-1], again.stderr
        resume = [sys.executable, "-m", "convnext", "train", "--resume", str(out), "--threads", "1"]
        again = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    else:
        assert "stopped before its first checkpoint" in again.stderr, again.stderr
    assert again.returncode == 0, again.stderr
    assert (out / "results.json").is_file() and (out / "best.pt").is_file()


@pytest.mark.slow  # two detection runs and a fresh process
def test_a_detection_run_killed_after_its_first_epoch_resumes_to_the_same_box_ap(tmp_path):
    """Before: kill -9 after epoch 1 of `detect train --run.ckpt_every_steps 2`, then --resume: box AP 0.0696 against
    0.0269 uninterrupted, weights 1e-3 apart. Now the resumed run ends with the uninterrupted run's weights, optimizer
    state and box AP."""
    data = write_instance_folder(tmp_path / "data", n=8)  # 6 train images at batch 2: 3 steps an epoch
    args = [*det_args(data), "--epochs", "2", "--batch-size", "2", "--run.num_workers", "0", "--run.ckpt_every_steps",
            "2", "--run.eval_every", "1", "--run.threads", "2"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "full")]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "DIE_AT": "3", "PYTHONPATH": str(ROOT)}  # the end of epoch 1, after its evaluation
    proc = subprocess.run([sys.executable, "-c", DIE_AFTER_SAVE, *args, "--output", str(killed)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert main(["detect", "train", "--resume", str(killed)]) == 0
    full, resumed = (load(d / "last.pt") for d in (tmp_path / "full", killed))
    assert_same_state(full, resumed)
    ap = [json.loads((d / "results.json").read_text())["box_AP"] for d in (tmp_path / "full", killed)]
    assert ap[0] == ap[1], ap


def test_a_detection_best_pt_holds_the_weights_only(tmp_path):
    """Before: an atto detection run's best.pt was as large as last.pt (276 MB: weights and AdamW's two moments).
    best.pt holds the best epoch's weights and no optimizer state (last.pt keeps it, for exact resume)."""
    cfg = det_config(write_instance_folder(tmp_path / "peds"), tmp_path / "run")
    train_detection(cfg)
    run = Path(cfg.run.output)
    best, last = load(run / "best.pt"), load(run / "last.pt")
    assert "optimizer" not in best and "optimizer" in last
    assert best["model"].keys() == last["model"].keys()
    assert (run / "best.pt").stat().st_size < 0.45 * (run / "last.pt").stat().st_size  # about a third

"""`convnext train` at 2 gloo processes on CPU: --shard (FSDP) ends where DDP does at the same global batch, a sharded
run and a DDP run each SIGKILLed mid-epoch and resumed end exactly where the uninterrupted run does, and the bad
inputs of a multi-process run (--shard without a process group or on a small model, ranks that see other data or
another 1x1 plan) stop in one line before any work.

--shard is refused for models that fit as a replica (by architecture: XL, XXL, V2-huge); the tests shard a
convnext_xxlarge shrunk by --model.kwargs to the tiny widths of the other training tests (about 100 k parameters), so
the run takes the route a real XXL run takes. Every random stream is on (stochastic depth, Mixup/CutMix, flips, each
rank drawing its own), so a resume has to restore every rank's.

Run as a script under torchrun, this file is a launcher: `test_train_shard.py ARGS...` runs `convnext ARGS...` with
"{rank}" in any argument replaced by the process's rank (a rank that sees another folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from convnext.data import build_dataset
from convnext.engine.checkpoint import load
from convnext.engine.distributed import data_digest

_spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).with_name("conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
_spec = importlib.util.spec_from_file_location("killed_run", Path(__file__).parents[1] / "engine" / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)

TINY = '{"depths": [1, 1, 2, 1], "dims": [8, 16, 32, 64]}'
ARGS = [
    "train", "--preset", "demo", "--model", "convnext_xxlarge", "--model.kwargs", TINY, "--img-size", "16",
    "--threads", "1", "--data.num_workers", "0", "--device", "cpu", "--epochs", "2", "--batch-size", "12",
    "--fast", "false",  # the CPU fast path swaps kernels in DDP runs only: both runs take the plain model's
    "--ema", "true", "--ema_decay", "0.9", "--model.drop_path_rate", "0.1", "--data.mixup", "0.8",
    "--data.cutmix", "1.0", "--data.hflip", "0.5",
]  # fmt: skip
STEPS = 6  # 36 training images, 12 a step, 2 epochs


def torchrun(*args: str) -> list[str]:
    """2 processes on this machine, each running `convnext ARGS` through this file's launcher."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True, timeout=240)


def errors(r: subprocess.CompletedProcess) -> list[str]:
    """The CLI's error lines: one a rank, or one only when torchrun stops the other rank (SIGTERM, when the first
    fails) before it has written its own."""
    tag = "convnext train: error:"  # from its start: another process's unfinished line may precede it, and the two
    # ranks' lines may reach torchrun's pipe glued on one line
    lines = [tag + part for line in r.stderr.splitlines() for part in line.split(tag)[1:]]
    assert 1 <= len(lines) <= 2, r.stderr[-3000:]
    return lines


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _conftest.write_image_folder(tmp_path_factory.mktemp("shard") / "shapes")


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs, trained once for the module: {"ddp": run folder, "shard": run folder}."""
    root, out = tmp_path_factory.mktemp("runs"), {}
    for kind, extra in (("ddp", []), ("shard", ["--shard"])):
        out[kind] = root / kind
        r = run2(*ARGS, "--data", str(data), *extra, "--output", str(out[kind]))
        assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_shard_ends_with_the_weights_of_ddp(runs, data, run_cli):
    """--shard and DDP at the same global batch end within rtol 2.4e-7 (two float32 eps: an ulp or two) and atol
    1e-8 (weights near zero) of each other, not bit for bit: torch's fused AdamW (the one build_optimizer takes)
    rounds a few updates an ulp apart on FSDP's DTensor shards than on whole tensors; with SGD, or AdamW unfused,
    the two are bitwise equal (tests/engine/test_fsdp.py). Measured here: 7.5e-9 at most after 6 steps. The sharded
    run's last.pt holds the gathered full weights, which `convnext eval` reads."""
    ddp, shard = load(runs["ddp"] / "last.pt"), load(runs["shard"] / "last.pt")
    assert ddp["step"] == shard["step"] == STEPS
    assert ddp["sharded"] is None and shard["sharded"] == "last.dcp" and shard["optimizer"] is None
    for key in ("model", "ema"):
        assert ddp[key].keys() == shard[key].keys()
        for name, t in ddp[key].items():
            torch.testing.assert_close(shard[key][name], t, rtol=2.4e-7, atol=1e-8, msg=f"{key} {name}")
    assert len(shard["rng"]) == 2  # one random state per rank
    r = run_cli("eval", str(runs["shard"] / "last.pt"), "--data", str(data / "val"), "--device", "cpu", "--no-ema",
                "--json", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads((runs["shard"] / "results.json").read_text())
    assert json.loads(r.stdout.splitlines()[-1])["top1"] == pytest.approx(result["top1"])


def kill_mid_epoch(args: list[str], out: Path) -> None:
    """Start `args` under torchrun and SIGKILL the launcher and both ranks at once (a machine lost) once the run
    has written its first checkpoint (a step of the first epoch: --ckpt_every_steps 1). torchrun starts each rank in
    a session of its own: killing its process group alone would leave the ranks to finish the run by themselves."""
    proc = subprocess.Popen(torchrun(*args, "--ckpt_every_steps", "1", "--output", str(out)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed_run.kill_torchrun(proc.pid)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def check_resumed(full: Path, killed: Path) -> None:
    """The resumed run's last.pt (weights, EMA, steps) and epoch rows are the uninterrupted run's."""
    a, b = load(full / "last.pt"), load(killed / "last.pt")
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "ema"):
        killed_run.same(a[key], b[key], key)
    rows_a = (full / "metrics.csv").read_text().splitlines()
    rows_b = (killed / "metrics.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 3
    assert rows_a[2].split(",")[4:7] == rows_b[2].split(",")[4:7]  # epoch 2's val loss, top-1, top-5


@pytest.mark.slow
def test_sharded_run_killed_mid_epoch_resumes_exactly(runs, data, tmp_path):
    """SIGKILL of both ranks after a mid-epoch save, then --resume: model, EMA and AdamW state (the shards in
    last.dcp/, read whole through DCP's converter) end bit for bit where the uninterrupted sharded run's do."""
    killed = tmp_path / "killed"
    kill_mid_epoch([*ARGS, "--data", str(data), "--shard"], killed)
    meta = load(killed / "last.dcp" / "meta.pt")  # the resume state (last.pt is written after it)
    assert meta["epoch"] == 0 and 0 < meta["epoch_step"] < meta["steps_per_epoch"], "not killed mid-epoch"
    assert len(meta["rng"]) == 2
    r = run2("train", "--resume", str(killed))
    assert r.returncode == 0, r.stderr[-3000:]
    check_resumed(runs["shard"], killed)
    full, resumed = tmp_path / "full.pt", tmp_path / "resumed.pt"
    dcp_to_torch_save(runs["shard"] / "last.dcp", full)
    dcp_to_torch_save(killed / "last.dcp", resumed)
    a, b = torch.load(full, weights_only=False), torch.load(resumed, weights_only=False)
    assert a["optimizer"]["state"], "the sharded checkpoint holds AdamW's state"
    killed_run.same(a, b, "last.dcp")


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_exactly(runs, data, tmp_path):
    """The same for a 2-process DDP run (no --shard): its last.pt, written by rank 0 with both ranks' random
    states, continues to the uninterrupted run's weights, EMA and AdamW state bit for bit."""
    killed = tmp_path / "killed"
    kill_mid_epoch([*ARGS, "--data", str(data)], killed)
    state = load(killed / "last.pt")
    assert state["epoch"] == 0 and 0 < state["epoch_step"] < state["steps_per_epoch"], "not killed mid-epoch"
    r = run2("train", "--resume", str(killed))
    assert r.returncode == 0, r.stderr[-3000:]
    check_resumed(runs["ddp"], killed)
    killed_run.same(load(runs["ddp"] / "last.pt")["optimizer"], load(killed / "last.pt")["optimizer"], "optimizer")


def test_shard_without_a_process_group_is_one_line(image_folder, tmp_path, run_cli):
    out = tmp_path / "run"
    r = run_cli(*ARGS, "--data", str(image_folder), "--shard", "--output", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "convnext train: error: --shard (FSDP) needs a process group of 2 or more processes: start with torchrun "
        "or srun"
    )
    assert not out.exists()


def test_shard_with_muon_is_one_line(image_folder, tmp_path, run_cli):
    """Muon orthogonalises whole weight matrices; FSDP splits them: refused before the data is read."""
    r = run_cli(*ARGS, "--data", str(image_folder), "--shard", "--optim.name", "muon", "--output", str(tmp_path / "r"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "convnext train: error: --shard: optim.name muon orthogonalizes whole weight matrices, which FSDP splits over "
        "the processes; use --optim.name adamw or sgd"
    )
    assert not (tmp_path / "r").exists()


def test_data_digest_sees_names_sizes_and_labels_not_the_mount_point(tmp_path):
    """The digest the ranks compare: the same images under another root match (a held-out split included); one
    image rewritten with another size, or moved to another class, does not."""
    a, b = (_conftest.write_image_folder(tmp_path / name) for name in ("a", "b"))
    train = [build_dataset(str(d / "train"), "train", None, val_split=0.2)[0] for d in (a, b)]
    assert data_digest(train[0]) == data_digest(train[1])
    assert data_digest(train[0]) != data_digest(build_dataset(str(a / "train"), "train", None, val_split=0.3)[0])
    (b / "train" / "circle" / "000.png").write_bytes((b / "train" / "circle" / "001.png").read_bytes() + b"\0")
    assert data_digest(train[0]) != data_digest(build_dataset(str(b / "train"), "train", None, val_split=0.2)[0])
    moved = _conftest.write_image_folder(tmp_path / "c")
    (moved / "train" / "circle" / "000.png").rename(moved / "train" / "square" / "100.png")
    assert data_digest(build_dataset(str(a), "train", None)[0]) != data_digest(
        build_dataset(str(moved), "train", None)[0]
    )


@pytest.mark.slow
def test_shard_on_a_small_model_is_one_line(image_folder, tmp_path):
    args = [a if a != "convnext_xxlarge" else "convnext_atto" for a in ARGS]
    r = run2(*args, "--data", str(image_folder), "--shard", "--output", str(tmp_path / "run"))
    assert r.returncode != 0
    line = ("convnext train: error: --shard is for convnext_xlarge, convnext_xxlarge, convnextv2_huge; convnext_atto "
            "fits on each GPU as a DDP replica: drop --shard")  # fmt: skip
    assert set(errors(r)) == {line}
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ranks_that_see_other_data_stop_in_one_line(tmp_path):
    """Rank 1's copy of the data lacks one training image: both ranks stop, naming rank 1, before any work."""
    for rank in (0, 1):
        _conftest.write_image_folder(tmp_path / f"data{rank}")
    (tmp_path / "data1" / "train" / "square" / "003.png").unlink()
    r = run2(*ARGS, "--data", str(tmp_path / "data{rank}"), "--output", str(tmp_path / "run"))
    assert r.returncode != 0
    line = ("convnext train: error: rank 1 of 2 sees another training data (file names, sizes and labels) than rank "
            "0: give every process the same --data (on every machine)")  # fmt: skip
    assert set(errors(r)) == {line}
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sharded_ranks_that_see_another_run_folder_stop_before_the_first_step(data, tmp_path):
    """Every rank of a sharded run writes its shards into the run folder: a rank that does not see rank 0's (here
    each rank is given its own --output, as machines without a shared filesystem would be) stops the run."""
    r = run2(*ARGS, "--data", str(data), "--shard", "--output", str(tmp_path / "run{rank}"))
    assert r.returncode != 0
    lines = errors(r)
    assert all(
        line.endswith("and rank(s) 1 see another one: put it on a filesystem every machine shares") for line in lines
    ), lines
    assert not any((tmp_path / "run0" / f).exists() for f in ("last.pt", "last.dcp"))


@pytest.mark.slow
def test_ranks_that_resume_another_plan_stop_in_one_line(image_folder, tmp_path, run_cli, tiny_args):
    """A resume where each machine reads its own copy of the run folder (no shared filesystem), and rank 1's copy
    holds another 1x1 plan: both ranks stop, naming rank 1 and the cure, before the run folder is touched."""
    run0 = tmp_path / "run0"
    r = run_cli("train", "--data", str(image_folder), "--batch-size", "6", "--epochs", "1", *tiny_args,
                "--output", str(run0))  # fmt: skip
    assert r.returncode == 0, r.stderr
    run1 = tmp_path / "run1"
    shutil.copytree(run0, run1)
    state = load(run1 / "last.pt")
    assert state["plan"], "the default fast_plan times the products"
    torch.save({**state, "plan": [[*row[:5], not row[5]] for row in state["plan"]]}, run1 / "last.pt")
    before = (run0 / "last.pt").read_bytes()
    r = run2("train", "--resume", str(tmp_path / "run{rank}"), "--epochs", "2")
    assert r.returncode != 0
    lines = errors(r)
    assert {line.split(": a resumed")[0] for line in lines} == {
        "convnext train: error: rank 1 of 2 sees another 1x1 plan of the fast path than rank 0"
    }
    assert all(line.endswith("/last.pt: put the run folder on a filesystem every machine shares") for line in lines)
    assert (run0 / "last.pt").read_bytes() == before


if __name__ == "__main__":
    from convnext.cli import main

    rank = os.environ.get("RANK", "0")
    sys.exit(main([a.replace("{rank}", rank) for a in sys.argv[1:]]))

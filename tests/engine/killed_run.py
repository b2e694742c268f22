"""2-process runs that lose their machine mid-epoch, for the SIGKILL + resume tests of pretrain, detect and segment.

Run as a script under torchrun, this file is a launcher: `killed_run.py ARGS... [--then ARGS...]...` runs
`convnext ARGS` in each rank, one command after the other in the same process group (a chain saves the 3 Python
starts a torchrun costs, most of a tiny run's time); with $DIE_AT set, right after rank 0 has written last.pt at
optimizer step $DIE_AT of the last command it SIGKILLs torchrun and every rank at once (a machine lost), so the run
stops at a known step and nothing of it lives on. torchrun starts each rank in a session of its own, so killing
torchrun's process group (`os.killpg`) would leave the ranks running: the kill names them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


THEN = "--then"  # separates the commands of a chain


def run2(*commands: Sequence[str], die_at: int | None = None) -> subprocess.CompletedProcess:
    """The `convnext` commands (argument lists), one after the other, on the same 2 gloo processes under torchrun;
    with `die_at`, the last one and every process are killed right after its save of that step."""
    args = [a for i, c in enumerate(commands) for a in ([THEN] if i else []) + list(c)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *args]
    env = ENV if die_at is None else {**ENV, "DIE_AT": str(die_at)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def ran(r: subprocess.CompletedProcess, die_at: int | None = None) -> None:
    """`r` ended as asked: done, or (`die_at`) SIGKILLed. A killed chain returns only once every process is gone
    (each held the pipes `subprocess.run` reads to their end)."""
    assert r.returncode == (0 if die_at is None else -signal.SIGKILL), r.stderr[-3000:]


def same(a: object, b: object, where: str) -> None:
    """`a` and `b` (nested dicts and lists of tensors and numbers) equal, tensors bit for bit, NaN to NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a} != {b}"  # NaN (an AP with no objects of a size) too


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after "(name) state" is the parent's pid
            out.append(int(p.name))
    return out


def kill_torchrun(agent: int) -> None:
    """SIGKILL torchrun's process `agent` and every rank it started, at once (a machine lost): the ranks are listed
    while torchrun is still their parent, then killed after it, this process last when it is one of them."""
    ranks = sorted(_children(agent), key=lambda pid: pid == os.getpid())
    for pid in (agent, *ranks):
        os.kill(pid, signal.SIGKILL)


def _split(args: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for a in args:
        if a == THEN:
            out.append([])
        else:
            out[-1].append(a)
    return out


def _die_after_save(step: int) -> None:
    """From now on, lose the machine once rank 0 has written last.pt at `step` (only rank 0 writes it)."""
    from convnext.engine.run import RunFolder

    save = RunFolder.save

    def save_then_die(self: RunFolder, payload: dict) -> None:
        save(self, payload)
        if payload["step"] == step:
            kill_torchrun(os.getppid())

    RunFolder.save = save_then_die


if __name__ == "__main__":
    from convnext.cli import main

    commands = _split(sys.argv[1:])
    if len(commands) > 1:  # one group for the chain: each command's `joined` finds it and leaves it be
        dist.init_process_group("gloo")
    for i, args in enumerate(commands):
        if i == len(commands) - 1 and "DIE_AT" in os.environ:
            _die_after_save(int(os.environ["DIE_AT"]))
        code = main(args)
        if code:
            sys.exit(code)
    if dist.is_initialized():
        dist.destroy_process_group()

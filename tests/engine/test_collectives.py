"""Collectives on the right device, by construction.

- No module of the package but `convnext/engine/distributed.py` calls a torch.distributed collective (ast).
- Run as a script under torchrun, this file is a guarded launcher: it wraps torch.distributed's tensor collectives
  so that a tensor on a device its process group does not serve (a CPU tensor under nccl, a CUDA tensor under gloo)
  fails the run, counts the calls it checked into $GUARD_LOG/rank<r>.json, then runs `convnext` with the arguments.
  The 2-process train / pretrain / dense tests start their runs through it.
- SLURM's variables are read when torchrun's are absent (subprocesses with srun's environment).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from convnext.engine.distributed import first_host, launch_env, served_devices

ROOT = Path(__file__).resolve().parents[2]
GUARD = Path(__file__).resolve()
# the collectives a job could hand a tensor to (object collectives pickle into tensors and call these)
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                      "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")  # fmt: skip
COLLECTIVES = (*TENSOR_COLLECTIVES, "all_gather_object", "broadcast_object_list", "gather_object", "barrier")
GROUP_DEVICE = {"gloo": {"cpu"}, "nccl": {"cuda"}}  # the test's own table: which tensors each backend takes here


def guarded_cmd(nproc: int = 2) -> list[str]:
    """torchrun with `nproc` processes on this machine, running the guarded launcher (append convnext's args)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(GUARD)]


def guard_counts(log_dir: Path) -> list[dict[str, int]]:
    """Each rank's {collective: calls checked}."""
    return [json.loads(p.read_text()) for p in sorted(log_dir.glob("rank*.json"))]


def install_guard(counts: dict[str, int]) -> None:
    """Wrap torch.distributed's tensor collectives: each checks its tensors' devices against the group's backend."""
    import torch.distributed.distributed_c10d as c10d

    def tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
        out = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out += [t for t in a if isinstance(t, torch.Tensor)]
        return out

    def guarded(name: str, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            backend = str(dist.get_backend(kwargs.get("group"))).lower()
            allowed = set().union(*(GROUP_DEVICE.get(b.rpartition(":")[2], set()) for b in backend.split(",")))
            for t in tensors(args, kwargs):
                if t.device.type not in allowed:
                    raise AssertionError(f"dist.{name} was handed a {t.device.type} tensor; the {backend} group "
                                         f"serves {sorted(allowed)}")  # fmt: skip
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return call

    for name in TENSOR_COLLECTIVES:
        wrapped = guarded(name, getattr(c10d, name))
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def _guarded_main() -> int:
    from convnext.cli import main

    counts: dict[str, int] = {}
    install_guard(counts)
    try:
        code = main(sys.argv[1:])
    finally:
        if os.environ.get("GUARD_LOG"):
            out = Path(os.environ["GUARD_LOG"])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))
    return int(code or 0)


# ---------------------------------------------------------------- no collective outside engine/distributed.py
def _collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            hits += [f"from {node.module} import {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            base = ast.unparse(node.value)
            if base in ("dist", "torch.distributed", "c10d") or base.startswith("torch.distributed."):
                hits.append(f"line {node.lineno}: {base}.{node.attr}")
    return hits


def test_only_engine_distributed_calls_collectives():
    pkg = ROOT / "convnext"
    own = pkg / "engine" / "distributed.py"
    assert _collective_calls(own), "the ast check finds nothing even where the collectives are"
    bad = {str(p.relative_to(ROOT)): h for p in sorted(pkg.rglob("*.py")) if p != own and (h := _collective_calls(p))}
    assert not bad, f"collectives outside convnext/engine/distributed.py: {bad}"


def test_ast_check_sees_a_direct_call(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch.distributed as dist\nfrom torch.distributed import all_gather\ndist.all_reduce(x)\n")
    assert _collective_calls(src) == ["from torch.distributed import all_gather", "line 3: dist.all_reduce"]


# ---------------------------------------------------------------- the guard and the group's device
def test_served_devices():
    assert served_devices("nccl") == {"cuda"} and served_devices("gloo") == {"cpu"}
    assert served_devices("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}


def test_guard_refuses_a_tensor_the_group_does_not_serve(tmp_path):
    """In a 1-process gloo group: a CPU tensor passes, one on another device (meta) fails before gloo sees it."""
    counts: dict[str, int] = {}
    import torch.distributed.distributed_c10d as c10d

    saved = {n: getattr(c10d, n) for n in TENSOR_COLLECTIVES}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        install_guard(counts)
        t = torch.ones(2)
        dist.all_reduce(t)
        with pytest.raises(AssertionError, match="all_reduce was handed a meta tensor; the gloo group serves"):
            dist.all_reduce(torch.ones(2, device="meta"))
        assert counts == {"all_reduce": 1}
    finally:
        for n, fn in saved.items():
            setattr(c10d, n, fn)
            setattr(dist, n, fn)
        dist.destroy_process_group()


# ---------------------------------------------------------------- SLURM
def test_first_host_of_a_slurm_node_list():
    assert first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host("a1,b2") == "a1"
    assert first_host("node[7]-ib") == "node7-ib"
    with pytest.raises(ValueError, match="SLURM_NODELIST"):
        first_host("")


def test_slurm_variables_when_torchrun_is_absent():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[11-12]"}
    assert launch_env(env) == (3, 8, 1)
    assert env["MASTER_ADDR"] == "gpu11" and env["MASTER_PORT"] == "29500"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    assert launch_env(torchrun) == (1, 2, 1)  # torchrun's variables win
    assert launch_env({}) == (0, 1, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = """
import json, sys, torch
from pathlib import Path
from convnext.engine.distributed import joined, all_reduce_sum, check_same_file
with joined("cpu") as info:
    t = all_reduce_sum(torch.tensor([float(info.rank + 1)]), info)
    folder = Path(sys.argv[1]) / ("shared" if info.rank == 0 or sys.argv[2] == "shared" else f"own{info.rank}")
    folder.mkdir(parents=True, exist_ok=True)
    if info.is_main or sys.argv[2] == "own":
        (folder / "config.json").write_text(json.dumps({"rank": info.rank}))
    same = check_same_file(Path(sys.argv[1]) / "shared" / "config.json" if info.is_main else folder / "config.json",
                           info)
    print(json.dumps({"rank": info.rank, "world": info.world_size, "sum": float(t), "same": same}))
"""


@pytest.mark.parametrize("folders", ["shared", "own"])
def test_two_srun_tasks_join_one_group(tmp_path, folders):
    """Two processes with srun's variables only (no torchrun) make one gloo group; with a folder each, the rank
    whose copy of config.json differs from rank 0's says so in one warning line."""
    port, procs = str(_free_port()), []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env |= {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                "SLURM_NODELIST": "localhost", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE, str(tmp_path), folders], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    rows = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert [(r["rank"], r["world"], r["sum"]) for r in rows] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert rows[0]["same"] and rows[1]["same"] is (folders == "shared")
    line = [ln for ln in outs[1][1].splitlines() if "rank 1:" in ln]
    assert len(line) == (0 if folders == "shared" else 1)
    if line:
        assert "differs here: put the run folder on a filesystem every machine shares" in line[0]


def test_one_process_group_takes_the_multi_process_paths(tmp_path):
    """CONVNEXT_PROCESS_GROUP=1 with one torchrun process: a real (gloo) group of one, DDP and every collective run,
    through the guard (benchmarks/gpu_check.py runs each job this way under nccl on one GPU)."""
    spec = importlib.util.spec_from_file_location("train_conftest", ROOT / "tests" / "train" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    data = conftest.write_image_folder(tmp_path / "data", n=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARD_LOG": str(tmp_path / "guard"), "CONVNEXT_PROCESS_GROUP": "1"}
    args = ["train", "--preset", "demo", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--output", str(tmp_path / "run"), "--model.kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}',
            "--threads", "1", "--img-size", "16", "--data.num_workers", "0"]  # fmt: skip
    r = subprocess.run([*guarded_cmd(1), *args], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (counts,) = guard_counts(tmp_path / "guard")
    assert counts.get("all_reduce", 0) >= 2 and counts.get("all_gather", 0) >= 1, counts


def test_gpu_check_lists_its_steps_and_skips_without_cuda(tmp_path):
    """benchmarks/gpu_check.py: --dry-run lists (a)-(e) anywhere; without CUDA it says so, exits 0, writes nothing."""
    script = ROOT / "benchmarks" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and [ln[:3] for ln in r.stdout.splitlines()] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    r = subprocess.run([sys.executable, str(script), "--only", "xz"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--only: no step xz" in r.stderr
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: run the check itself")
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "results")], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "no CUDA device here" in r.stdout and not (tmp_path / "results").exists()


if __name__ == "__main__":
    sys.exit(_guarded_main())

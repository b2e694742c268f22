"""Checkpoints as plain data (tensors, numbers, strings, dicts, lists): `torch.load(weights_only=True)` reads
them. Writes are atomic (a temp file in the same folder, fsync, then rename), so a crash never leaves half a file;
the file gets the mode the user's umask gives a new file.

A training checkpoint holds: model, ema (or None), optimizer, scheduler (the schedule's resolved numbers),
scaler (or None), rng, epoch, epoch_step (optimizer steps done in that epoch), step (global), best_top1, config,
plan (how the CPU fast path runs its products, `fast.plan_to_rows`, or None).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnext.engine.distributed import DistInfo, barrier
from convnext.weights.io import apply_umask


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """torch.save to `path` through a temp file + rename: `path` is the old file or the whole new one, never half.
    A failed write (disk full, quota) raises OSError naming `path`, its temp file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "inline_container" in str(e)):
            # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed (disk full?)"
            raise OSError(getattr(e, "errno", None), f"cannot write {path}: {reason}; the previous file is kept") from e
        raise
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (plain data only), with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding pickled objects
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from (torch CPU/CUDA, Python, NumPy) as plain data."""
    np_state, py = np.random.get_state(), random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(py[1]),
        "python_version": py[0],
        "python_gauss": py[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"]), state.get("python_gauss")))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """One clear error when `state` does not fit `model` (missing/extra keys or other shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        detail = "; ".join(
            s
            for s in (
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}" if extra else "",
                f"shape {shapes[:3]}" if shapes else "",
            )
            if s
        )
        raise ValueError(f"{source} is from another model than {type(model).__name__} configured here: {detail}")


# ---------------------------------------------------------------- sharded (FSDP) checkpoints
def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> dict[str, Any]:
    """What a sharded checkpoint holds, as each rank's shards (DTensors): model, optimizer and (when kept) EMA."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)  # its sharded module's shards and n_averaged
    return state


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    info: DistInfo,
    ema: nn.Module | None = None,
) -> Path:
    """Every rank writes its shards of `model`, `optimizer` and `ema` into the folder `path` with
    torch.distributed.checkpoint (no rank gathers the whole model); rank 0 adds `meta` (plain data: step, rng of every
    rank, config) as meta.pt. Written to a temp folder and renamed, so `path` is the old checkpoint or the whole new
    one. Call on every rank."""
    import shutil

    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(info)
    dcp.save(_sharded_state(model, optimizer, ema), checkpoint_id=tmp)
    if info.is_main:
        save_atomic(meta, tmp / "meta.pt")
        old = path.with_name(f".{path.name}.old")  # a kill at any point leaves `path` or `old` whole
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return path


def load_sharded(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None = None
) -> dict[str, Any]:
    """Read a `save_sharded` folder into the sharded `model`, `optimizer` and `ema` (any number of ranks: DCP
    reshards); returns its meta. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    if not (path / "meta.pt").is_file():
        old = path.with_name(f".{path.name}.old")  # killed between renaming the old folder and the new one in
        if not (old / "meta.pt").is_file():
            raise FileNotFoundError(f"no sharded checkpoint at {path} (no meta.pt)")
        path = old
    state = _sharded_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ema is not None:
        set_model_state_dict(ema, state["ema"])
    return load(path / "meta.pt")


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 (a sharded model's gathered; {} on the other ranks).
    Call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

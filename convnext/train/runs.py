"""A run folder: what `convnext train` writes (config.json, metrics, checkpoints, results.json), claiming it for a
run (a lock; an existing run is kept unless resumed or overwritten) and loading a trained model back from it.

`convnext.infer` and `convnext.dense` read runs through `load_run` here; `fit` claims and fills them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from convnext.engine import checkpoint as ckpt
from convnext.engine.ema import ema_weights
from convnext.registry import create_model
from convnext.train.config import ModelConfig, from_dict

RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "curves.png", "results.json")


def build_model(mcfg: ModelConfig, num_classes: int, init_weights: bool = True) -> nn.Module:
    """The configured model with `num_classes` outputs; with `init_weights`, from its pretrained/checkpoint
    weights (the head adapts to the classes)."""
    kwargs = mcfg.build_kwargs() | {"num_classes": num_classes}
    if not init_weights:
        return create_model(mcfg.name.split(".")[0], **kwargs)
    return create_model(mcfg.name, pretrained=mcfg.pretrained, checkpoint=mcfg.checkpoint, **kwargs)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Any:
    """Hold `run_dir/.lock` for the run: a second run started on the same folder is refused, not interleaved."""
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(
                f"another run is writing to {run_dir} (pid {f.read().strip() or '?'}); wait for it or "
                "choose another --output"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, files: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Refuse an output that cannot take this run; return the old run's `files` that --overwrite replaces (they
    are removed by `claim_run_dir` only when the new run is about to write, so a run that fails in set-up loses
    nothing)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--output {run_dir} is a file, not a folder")
    if any(parent.exists() and not parent.is_dir() for parent in run_dir.parents):
        raise NotADirectoryError(f"--output {run_dir} lies below a file")
    nearest = next(d for d in (run_dir, *run_dir.parents) if d.exists())
    if not os.access(nearest, os.W_OK):
        raise PermissionError(f"--output {run_dir}: {nearest} is not writable")
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir / 'last.pt'} does not exist")
        return []
    existing = [f for f in files if (run_dir / f).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(existing)}); continue it with --resume {run_dir}, "
            "or pass --overwrite, or choose another --output"
        )
    return existing


def claim_run_dir(run_dir: Path, old_files: list[str], held: contextlib.ExitStack) -> None:
    """Make `run_dir`, hold its lock for as long as `held` lives, drop temporary files a killed save left, and
    only now remove the old run's `old_files` (--overwrite)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(run_lock(run_dir))
    for tmp in run_dir.glob(".*.pt.*.tmp"):  # left by a process killed while it saved
        tmp.unlink(missing_ok=True)
    for f in old_files:
        (run_dir / f).unlink(missing_ok=True)


def load_run(run_dir: str | Path, which: str = "best", ema: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model from a run folder (in eval mode, on CPU) and its resolved config as a plain dict.

    which: "best" or "last" checkpoint; ema: the EMA weights instead of the model's. Class names are
    `cfg["data"]["classes"]`; eval preprocessing is `cfg["data"]` img_size, crop_pct, mean, std.
    """
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', not {which!r}")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    cfg_dict = json.loads(cfg_path.read_text())
    cfg = from_dict(cfg_dict)
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.exists():
        path = run_dir / "last.pt"
    state = ckpt.load(path)
    weights = state["model"]
    if ema:
        if state.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (the run had ema=false)")
        weights = ema_weights(state["ema"])
    model = build_model(cfg.model, len(cfg.data.classes), init_weights=False)
    ckpt.check_compatible(model, weights, f"checkpoint {path}")
    model.load_state_dict(weights)
    return model.eval(), cfg_dict

"""A run folder: what a training job writes (config.json, metrics, last.pt, best.pt, results.json), checked before
any work, claimed for the run (a lock; an existing run is kept unless resumed or overwritten), and written in one
place: the checkpoint payload through `checkpoint.save_atomic`, best.pt as a copy of last.pt, JSON files whole.

Every job (classification, FCMAE pre-training, detection, segmentation) uses this one class.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convnext.engine import checkpoint as ckpt

log = logging.getLogger("convnext.train")

SHARDED_STATE = "last.dcp"  # a --shard run's resume state: every rank's shards (engine/checkpoint.save_sharded)
RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "curves.png", "results.json")


def _take(f: Any, run_dir: Path, mode: int = fcntl.LOCK_EX) -> None:
    """Lock the open lock file `f` (`mode`), or one clear error naming the process that holds it. A run's lock is
    exclusive and a check's shared: the ranks of one run check the folder at once, and a rank's check (a moment
    long) never refuses its peer's; the claim waits up to a second for such a check to pass."""
    deadline = time.monotonic() + (1.0 if mode == fcntl.LOCK_EX else 0.0)
    while True:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    f.seek(0)
    raise RuntimeError(
        f"another run is writing to {run_dir} (pid {f.read().strip() or '?'}); wait for it or choose another --output"
    ) from None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir/.lock` for the run: a second run started on the same folder is refused, not interleaved."""
    with open(run_dir / ".lock", "a+") as f:
        _take(f, run_dir)
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_not_held(run_dir: Path) -> None:
    """One clear error when another process holds `run_dir`'s lock (it is writing a run there)."""
    if (run_dir / ".lock").is_file():
        with open(run_dir / ".lock", "a+") as f:
            _take(f, run_dir, fcntl.LOCK_SH)
            fcntl.flock(f, fcntl.LOCK_UN)


class RunFolder:
    """One run's folder. `RunFolder(path, resume=..., overwrite=...)` checks it (nothing is written yet);
    `claim(held)` makes it and holds its lock while `held` lives; then `write_json`, `save` and `keep_best` fill it.
    A folder whose run stopped before its first checkpoint (in set-up, or Ctrl-C early) is started again by the same
    command, and `--resume` of it starts it from the beginning (each said in one line).

    files: the names this job writes; with --overwrite they are removed only in `claim`, when data and model are
    built, so a run that fails in set-up loses nothing. subfolders: folders of the job's own (pictures) that
    --overwrite clears too.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        files: tuple[str, ...] = RUN_FILES,
        subfolders: tuple[str, ...] = (),
    ):
        self.path, self.resume, self.subfolders = Path(path), resume, subfolders
        self.old_files = self._check(overwrite, files)

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    def _check(self, overwrite: bool, files: tuple[str, ...]) -> list[str]:
        """Refuse a folder that cannot take this run; return the old run's files that --overwrite replaces."""
        run_dir = self.path
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(f"--output {run_dir} is a file, not a folder")
        if any(parent.exists() and not parent.is_dir() for parent in run_dir.parents):
            raise NotADirectoryError(f"--output {run_dir} lies below a file")
        nearest = next(d for d in (run_dir, *run_dir.parents) if d.exists())
        if not os.access(nearest, os.W_OK):
            raise PermissionError(f"--output {run_dir}: {nearest} is not writable")
        _check_not_held(run_dir)  # a second run on a busy folder is refused now, before its data is read
        # what a run that stopped in set-up or before its first checkpoint leaves: its config and the lock it held
        started = (run_dir / "config.json").is_file() and (run_dir / ".lock").is_file()
        if self.resume and not self.last.is_file() and started:
            log.info("%s stopped before its first checkpoint: --resume starts it again from the beginning", run_dir)
            self.resume = False
        elif self.resume:
            if not self.last.is_file():
                raise FileNotFoundError(f"nothing to resume: {self.last} does not exist")
            return []
        existing = [f for f in files if (run_dir / f).exists()]
        if existing and started and not self.last.is_file():
            log.info("%s holds a run that stopped before its first checkpoint (%s): starting it again", run_dir,
                     ", ".join(existing))  # fmt: skip
            return existing
        if existing and not overwrite:
            raise ValueError(
                f"{run_dir} already holds a run ({', '.join(existing)}); continue it with --resume {run_dir}, "
                "or pass --overwrite, or choose another --output"
            )
        return existing

    def load_last(self) -> dict[str, Any]:
        """The checkpoint to resume from (plain data, `weights_only` load)."""
        return ckpt.load(self.last)

    def claim(self, held: contextlib.ExitStack) -> None:
        """Make the folder, hold its lock for as long as `held` lives, drop temporary files a killed save left, and
        only now remove the old run's files (--overwrite)."""
        self.path.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lock(self.path))
        for tmp in self.path.glob(".*.pt.*.tmp"):  # left by a process killed while it saved
            tmp.unlink(missing_ok=True)
        for f in self.old_files:
            (self.path / f).unlink(missing_ok=True)
        if self.old_files:  # the old run's subfolders and its sharded resume state (`--shard`: last.dcp/)
            for sub in (*self.subfolders, SHARDED_STATE, f".{SHARDED_STATE}.old", f".{SHARDED_STATE}.tmp"):
                shutil.rmtree(self.path / sub, ignore_errors=True)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """config.json, results.json: written whole (temp file + rename)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path / name)

    def save(self, payload: dict[str, Any]) -> None:
        """last.pt, atomically: the old file or the whole new one."""
        ckpt.save_atomic(payload, self.last)

    def keep_best(self, payload: dict[str, Any]) -> None:
        """best.pt, atomically: the weights (and EMA) of the best scored epoch with the config, no optimizer state
        (a run resumes from last.pt; best.pt is for evaluation and fine-tuning)."""
        ckpt.save_atomic(payload, self.best)

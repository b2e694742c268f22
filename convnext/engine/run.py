"""A run folder: what a training job writes (config.json, metrics, last.pt, best.pt, results.json), checked before
any work, claimed for the run (a lock; an existing run is kept unless resumed or overwritten), and written in one
place: the checkpoint payload through `checkpoint.save_atomic`, best.pt as a copy of last.pt, JSON files whole.

Every job (classification, FCMAE pre-training, detection, segmentation) uses this one class.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convnext.engine import checkpoint as ckpt

RUN_FILES = ("config.json", "last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "curves.png", "results.json")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
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


class RunFolder:
    """One run's folder. `RunFolder(path, resume=..., overwrite=...)` checks it (nothing is written yet);
    `claim(held)` makes it and holds its lock while `held` lives; then `write_json`, `save` and `keep_best` fill it.

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
        if self.resume:
            if not self.last.is_file():
                raise FileNotFoundError(f"nothing to resume: {self.last} does not exist")
            return []
        existing = [f for f in files if (run_dir / f).exists()]
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
        if self.old_files:
            for sub in self.subfolders:
                shutil.rmtree(self.path / sub, ignore_errors=True)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """config.json, results.json: written whole (temp file + rename)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path / name)

    def save(self, payload: dict[str, Any]) -> None:
        """last.pt, atomically: the old file or the whole new one."""
        ckpt.save_atomic(payload, self.last)

    def keep_best(self) -> None:
        """best.pt becomes a copy of last.pt (through a temp file: a crash leaves the previous best)."""
        tmp = self.path / ".best.pt.tmp"
        shutil.copyfile(self.last, tmp)
        tmp.replace(self.best)

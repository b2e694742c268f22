"""What a run folder shows people: metrics.csv / metrics.jsonl (one row per epoch), curves.png, TensorBoard."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_loss",
    "ema_top1",
    "ema_top5",
    "img_per_s",
    "epoch_time_s",
    "elapsed_s",
    "skipped_images",
    "data_wait_pct",
]


class MetricsLog:
    """Appends one row per epoch to metrics.csv (`columns`) and metrics.jsonl (every key); `tensorboard=True` also
    writes events."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, columns: Sequence[str] = COLUMNS):
        self.dir, self.columns = Path(run_dir), list(columns)
        self.csv, self.jsonl = self.dir / "metrics.csv", self.dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"))

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after `epoch` (a resumed run rewrites what the interrupted one logged later)."""
        rows = [r for r in self.rows() if int(r["epoch"]) <= epoch]
        self.csv.unlink(missing_ok=True)
        self.jsonl.unlink(missing_ok=True)
        for r in rows:
            self.append(r, tb=False)

    def append(self, row: dict[str, Any], tb: bool = True) -> None:
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in self.columns})
        with self.jsonl.open("a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        if self.tb is not None and tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, int(row["step"]))
            self.tb.flush()

    def rows(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plot_curves(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Loss, top-1 and lr per epoch, side by side, as one PNG. Returns the path (None with no rows)."""
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    ep = [r["epoch"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in rows]

    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot(ep, series("train_loss"), label="train")
    axes[0].plot(ep, series("val_loss"), label="val")
    if any("ema_loss" in r for r in rows):
        axes[0].plot(ep, series("ema_loss"), label="val (EMA)")
    axes[0].set_title("loss")
    axes[1].plot(ep, series("val_top1"), label="top-1")
    axes[1].plot(ep, series("val_top5"), label="top-5", alpha=0.6)
    if any("ema_top1" in r for r in rows):
        axes[1].plot(ep, series("ema_top1"), label="top-1 (EMA)")
    axes[1].set_title("val accuracy (%)")
    axes[2].plot(ep, series("lr"))
    axes[2].set_title("lr (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)

"""What a run folder shows people: metrics.csv / metrics.jsonl (one row per epoch), curves.png, TensorBoard, and
the MLflow / Weights & Biases runs (offline, in the run folder) of `--log mlflow|wandb`."""

from __future__ import annotations

import csv
import json
import math
import os
import time
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
    if any("val_macro_f1" in r for r in rows):
        axes[1].plot(ep, series("val_macro_f1"), label="macro-F1")
        axes[1].plot(ep, series("val_balanced_accuracy"), label="balanced acc", alpha=0.6)
    if any("ema_top1" in r for r in rows):
        axes[1].plot(ep, series("ema_top1"), label="top-1 (EMA)")
    axes[1].set_title("val scores (%)")
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


TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker name -> the module it needs (extra `track`)


class Trackers:
    """The run's MLflow and/or Weights & Biases runs (`names`), offline into the run folder: MLflow to the file
    store `run_dir/mlruns` (unless MLFLOW_TRACKING_URI names another), W&B in offline mode under `run_dir/wandb`
    (unless WANDB_MODE says otherwise). They carry the config (parameters), each epoch's row (metrics, step = the
    epoch), curves.png and, at `finish`, the final results and run files. Nothing is started before the first row
    (the run folder is claimed by then); a resumed run continues the runs whose ids `trackers.json` keeps. Use on
    the main process only."""

    def __init__(self, names: Sequence[str], run_dir: str | Path, config: dict[str, Any], resume: bool = False):
        self.names, self.dir, self.config, self.resume = list(names), Path(run_dir), config, resume
        self.mlflow: Any = None  # (client, run id)
        self.wandb: Any = None  # the wandb Run
        self.started = False

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        ids_file = self.dir / "trackers.json"
        ids = json.loads(ids_file.read_text()) if self.resume and ids_file.exists() else {}
        name = self.dir.name
        if "mlflow" in self.names:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.dir / "mlruns").resolve().as_uri()
            if uri.startswith("file:"):  # MLflow 3 asks for an opt-in to its file store (no database needed)
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(tracking_uri=uri)
            run_id = ids.get("mlflow")
            if run_id is None:
                exp = client.get_experiment_by_name("convnext")
                exp_id = exp.experiment_id if exp is not None else client.create_experiment("convnext")
                run_id = client.create_run(exp_id, run_name=name).info.run_id
                params = [Param(k, str(v)[:500]) for k, v in _flat(self.config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                    client.log_batch(run_id, params=params[i : i + 100])
            self.mlflow = (client, run_id)
            ids["mlflow"] = run_id
        if "wandb" in self.names:
            import wandb

            mode = os.environ.get("WANDB_MODE", "offline")
            self.wandb = wandb.init(project="convnext", name=name, dir=str(self.dir), mode=mode, config=self.config,
                                    id=ids.get("wandb"), resume="allow" if ids.get("wandb") else None)  # fmt: skip
            ids["wandb"] = self.wandb.id
        ids_file.write_text(json.dumps(ids))

    def log_row(self, row: dict[str, Any], curves: Path | None = None) -> None:
        """An epoch's numbers (step = the epoch) and the curves drawn after it."""
        self._start()
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        epoch = int(row["epoch"])
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            ms = int(time.time() * 1000)
            metrics = [Metric(k, v, ms, epoch) for k, v in numbers.items() if math.isfinite(v)]
            client.log_batch(run_id, metrics=metrics)
            if curves is not None:
                client.log_artifact(run_id, str(curves))
        if self.wandb is not None:
            import wandb

            extra = {"curves": wandb.Image(str(curves))} if curves is not None else {}
            self.wandb.log(numbers | extra, step=epoch)

    def finish(self, result: dict[str, Any] | None, files: Sequence[Path] = (), failed: bool = False) -> None:
        """The final results (as metrics `final/...` and a summary) and `files`, then close the runs."""
        if result is not None:
            self._start()  # a run that logged no row (resumed when already finished) still reports its results
        numbers = {k: float(v) for k, v in (result or {}).items() if isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
        present = [str(f) for f in files if Path(f).is_file()]
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            ms = int(time.time() * 1000)
            if numbers:
                client.log_batch(run_id, metrics=[Metric(f"final/{k}", v, ms, 0) for k, v in numbers.items()])
            for f in present:
                client.log_artifact(run_id, f)
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.summary.update({f"final/{k}": v for k, v in numbers.items()})
            for f in present:
                self.wandb.save(f, base_path=str(Path(f).parent), policy="now")
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out

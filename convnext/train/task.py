"""Image classification as the run engine's task: the loss of a batch (cross-entropy after Mixup/CutMix, under
autocast, weighted per class with `data.balance weights`), top-1/top-5, macro-F1 and balanced accuracy of the model
and its EMA over the val loader (summed over processes, averaged over the test-time views the run trains with),
and curves.png (and the trackers' rows) after every epoch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from convnext.data import mix_transform
from convnext.data.transforms import tta_logits
from convnext.engine.distributed import DistInfo, all_reduce_sum
from convnext.engine.loop import autocast
from convnext.engine.report import Trackers, plot_curves
from convnext.scores import class_report
from convnext.train.config import TrainConfig

# --select NAME: the row key that picks best.pt and that early stopping watches, and whether larger is better
SELECT = {
    "top1": ("val_top1", True),
    "macro_f1": ("val_macro_f1", True),
    "balanced_accuracy": ("val_balanced_accuracy", True),
    "loss": ("val_loss", False),
}


@dataclass
class ClassificationTask:
    """The engine's task for image classification."""

    cfg: TrainConfig
    info: DistInfo
    val_loader: Any
    num_classes: int
    run_dir: Path
    class_weights: torch.Tensor | None = None  # cross-entropy weight per class (data.balance weights)
    trackers: Trackers | None = None  # MLflow / W&B, on the main process
    best_key: str = "val_top1"
    best_larger: bool = True
    columns: tuple[str, ...] = (
        "epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "val_macro_f1",
        "val_balanced_accuracy", "ema_loss", "ema_top1", "ema_top5", "ema_macro_f1", "ema_balanced_accuracy",
        "img_per_s", "epoch_time_s", "elapsed_s", "skipped_images", "data_wait_pct",
    )  # fmt: skip

    def __post_init__(self) -> None:
        d = self.cfg.data
        self.mix = mix_transform(self.num_classes, d.mixup, d.cutmix, d.switch_prob, d.mix_prob)
        self.best_key, self.best_larger = SELECT[self.cfg.select]
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(self.info.device)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
        x, y = _to_device(x, y, self.info.device, self.cfg.channels_last)
        if self.mix is not None:
            x, y = self.mix(x, y)
        with autocast(self.info.device, self.cfg.amp):
            logits = model(x)
        return F.cross_entropy(
            logits.float(), y, weight=self.class_weights, label_smoothing=self.cfg.data.label_smoothing
        )

    def evaluate(self, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
        d, kw = self.cfg.data, {"info": self.info, "amp": self.cfg.amp, "channels_last": self.cfg.channels_last}
        kw |= {"tta_flip": d.tta_flip, "tta_shift": d.tta_shift, "num_classes": self.num_classes}
        keys = ("loss", "top1", "top5", "macro_f1", "balanced_accuracy")
        m = evaluate(model, self.val_loader, desc="eval", **kw)
        row = {f"val_{k}": m[k] for k in keys} | {"val_n": m["n"]}
        if ema is not None:
            e = evaluate(ema.module, self.val_loader, desc="eval EMA", **kw)
            row |= {f"ema_{k}": e[k] for k in keys}
        if m["skipped"]:
            row["val_skipped"] = m["skipped"]
        return row

    def summary(self, row: dict[str, Any]) -> str:
        out = (
            f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% macro-F1 {row['val_macro_f1']:.2f}% "
            f"balanced acc {row['val_balanced_accuracy']:.2f}% loss {row['val_loss']:.4f}"
        )
        return out + (f"  EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else "")

    def epoch_end(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        curves = plot_curves(rows, self.run_dir / "curves.png")
        if self.trackers is not None and rows:
            self.trackers.log_row(rows[-1], curves)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    info: DistInfo,
    amp: str = "none",
    channels_last: bool = False,
    tta_flip: bool = False,
    tta_shift: int = 0,
    desc: str = "eval",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Top-1, top-5, macro-F1 and balanced accuracy (in %, `scores.class_report` of the confusion matrix), mean
        cross-entropy and image count over `loader`, summed over all processes (`num_classes`: the logits' count, so a
    process with no val image still joins the confusion matrix's sum). With `tta_flip` / `tta_shift` the logits are
        the mean over the views `data.tta_logits` makes."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, n, skipped
    cm: torch.Tensor | None = None  # (true class, predicted class) counts
    bar = tqdm(loader, desc=desc, disable=True if not info.is_main else None, leave=False, unit="batch")
    for x, y, n_bad in bar:
        sums[4] += n_bad
        if len(y) == 0:
            continue
        x, y = _to_device(x, y, info.device, channels_last)
        with autocast(info.device, amp):
            logits = tta_logits(model, x, tta_flip, tta_shift)
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(y[:, None])
        sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += hit[:, 0].sum().item()
        sums[2] += hit.any(dim=1).sum().item()
        sums[3] += len(y)
        c = logits.shape[1]
        cm = torch.zeros(c * c, dtype=torch.float64) if cm is None else cm
        cm += torch.bincount((y * c + logits.argmax(1)).cpu(), minlength=c * c).double()
    bar.close()
    sums = all_reduce_sum(sums, info)
    n = max(float(sums[3]), 1.0)
    c = num_classes or (int(round(len(cm) ** 0.5)) if cm is not None else 1)
    cm = all_reduce_sum(cm if cm is not None else torch.zeros(c * c, dtype=torch.float64), info)
    report = class_report(cm.view(c, c).numpy())
    return {
        "loss": float(sums[0]) / n,
        "top1": 100.0 * float(sums[1]) / n,
        "top5": 100.0 * float(sums[2]) / n,
        "macro_f1": 100.0 * report["macro_f1"],
        "balanced_accuracy": 100.0 * report["balanced_accuracy"],
        "n": int(sums[3]),
        "skipped": int(sums[4]),
    }

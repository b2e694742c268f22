"""Image classification as the run engine's task: the loss of a batch (cross-entropy after Mixup/CutMix, under
autocast), top-1/top-5 of the model and its EMA over the val loader (summed over processes, averaged over the
test-time views the run trains with), and curves.png after every epoch."""

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
from convnext.engine.report import plot_curves
from convnext.train.config import TrainConfig


@dataclass
class ClassificationTask:
    """The engine's task for image classification."""

    cfg: TrainConfig
    info: DistInfo
    val_loader: Any
    num_classes: int
    run_dir: Path
    best_key: str = "val_top1"
    columns: tuple[str, ...] = (
        "epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "ema_loss", "ema_top1",
        "ema_top5", "img_per_s", "epoch_time_s", "elapsed_s", "skipped_images", "data_wait_pct",
    )  # fmt: skip

    def __post_init__(self) -> None:
        d = self.cfg.data
        self.mix = mix_transform(self.num_classes, d.mixup, d.cutmix, d.switch_prob, d.mix_prob)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: int) -> torch.Tensor:
        x, y = _to_device(x, y, self.info.device, self.cfg.channels_last)
        if self.mix is not None:
            x, y = self.mix(x, y)
        with autocast(self.info.device, self.cfg.amp):
            logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.data.label_smoothing)

    def evaluate(self, model: nn.Module, ema: nn.Module | None) -> dict[str, Any]:
        d, kw = self.cfg.data, {"info": self.info, "amp": self.cfg.amp, "channels_last": self.cfg.channels_last}
        kw |= {"tta_flip": d.tta_flip, "tta_shift": d.tta_shift}
        m = evaluate(model, self.val_loader, desc="eval", **kw)
        row = {"val_loss": m["loss"], "val_top1": m["top1"], "val_top5": m["top5"], "val_n": m["n"]}
        if ema is not None:
            e = evaluate(ema.module, self.val_loader, desc="eval EMA", **kw)
            row |= {"ema_loss": e["loss"], "ema_top1": e["top1"], "ema_top5": e["top5"]}
        if m["skipped"]:
            row["val_skipped"] = m["skipped"]
        return row

    def summary(self, row: dict[str, Any]) -> str:
        out = f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% loss {row['val_loss']:.4f}"
        return out + (f"  EMA top-1 {row['ema_top1']:.2f}%" if "ema_top1" in row else "")

    def epoch_end(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        plot_curves(rows, self.run_dir / "curves.png")


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
) -> dict[str, Any]:
    """Top-1, top-5 (in %), mean cross-entropy and image count over `loader`, summed over all processes.
    With `tta_flip` / `tta_shift` the logits are the mean over the views `data.tta_logits` makes."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss, top1, top5, n, skipped
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
    bar.close()
    sums = all_reduce_sum(sums, info)
    n = max(float(sums[3]), 1.0)
    return {
        "loss": float(sums[0]) / n,
        "top1": 100.0 * float(sums[1]) / n,
        "top5": 100.0 * float(sums[2]) / n,
        "n": int(sums[3]),
        "skipped": int(sums[4]),
    }

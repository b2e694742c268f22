"""Predict with a detection or segmentation run and write overlay PNGs a person can look at.

Detection: boxes with "class score" captions and filled instance masks, one colour per class.
Segmentation: the class map blended over the image in the dataset's palette, plus the raw class-id PNG.
Drawing is torchvision's (`draw_bounding_boxes`, `draw_segmentation_masks`).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from convnext.data.decode import BadImageError, find_images
from convnext.dense.config import DetectConfig, SegmentConfig
from convnext.dense.data import read_rgb
from convnext.dense.train import segment_logits


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """`n` well-separated RGB colours (golden-ratio hues), the same for the same n."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_detections(
    image: torch.Tensor,
    pred: dict[str, torch.Tensor],
    classes: list[str],
    score_thresh: float = 0.5,
    colours: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """(3, H, W) uint8 -> the same with the detections above `score_thresh`: masks (alpha 0.45), boxes, captions."""
    keep = pred["scores"] >= score_thresh
    labels = pred["labels"][keep].tolist()
    colours = colours or class_colours(len(classes))
    colour = [colours[c % len(colours)] for c in labels]
    out = image
    if "masks" in pred and keep.any():
        out = draw_segmentation_masks(out, pred["masks"][keep][:, 0] > 0.5, alpha=0.45, colors=colour)
    captions = [
        f"{classes[c] if c < len(classes) else c} {s:.2f}" for c, s in zip(labels, pred["scores"][keep].tolist())
    ]
    return draw_bounding_boxes(out, pred["boxes"][keep], labels=captions, colors=colour, width=2)


def draw_classes(
    image: torch.Tensor, classmap: torch.Tensor, colours: list[tuple[int, int, int]], alpha: float = 0.5
) -> torch.Tensor:
    """(3, H, W) uint8 with the (H, W) class map blended in: one colour per class present."""
    present = classmap.unique().tolist()
    present = [c for c in present if 0 <= c < len(colours)]
    if not present:
        return image
    masks = torch.stack([classmap == c for c in present])
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[colours[c] for c in present])


def image_files(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (`data.decode.find_images`, not recursing); a missing path
    is a FileNotFoundError naming it."""
    missing = [str(p) for p in map(Path, paths) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such image or folder")
    return find_images(paths, recursive=False)


@torch.inference_mode()
def predict_detection(
    model: nn.Module,
    cfg: DetectConfig,
    images: list[Path],
    out_dir: Path,
    score_thresh: float | None = None,
    device: str | torch.device = "cpu",
    skipped: list[str] | None = None,
) -> list[Path]:
    """Overlay PNGs `out_dir/<stem>.png` for each image; returns their paths. With `skipped` (a list), an image
    that cannot be read is left out and its error (naming the file) appended; without, it raises."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    thresh = cfg.score_thresh if score_thresh is None else score_thresh
    written = []
    for path in images:
        if (image := _read(path, skipped)) is None:
            continue
        pred = {k: v.cpu() for k, v in model([image.float().div(255).to(device)])[0].items()}
        written.append(_write_png(draw_detections(image, pred, cfg.data.classes, thresh), out_dir / f"{path.stem}.png"))
    return written


@torch.inference_mode()
def predict_segmentation(
    model: nn.Module,
    cfg: SegmentConfig,
    images: list[Path],
    out_dir: Path,
    device: str | torch.device = "cpu",
    skipped: list[str] | None = None,
) -> list[Path]:
    """For each image: `out_dir/<stem>.png` (overlay) and `out_dir/<stem>_classes.png` (class ids, mode L);
    unreadable images as in `predict_detection`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    colours = [tuple(c) for c in cfg.data.palette] or class_colours(cfg.data.num_classes)
    written = []
    for path in images:
        if (image := _read(path, skipped)) is None:
            continue
        x = image.float().div(255)[None].to(device)
        classmap = segment_logits(model, x, cfg, tuple(image.shape[-2:])).argmax(1)[0].cpu()
        written.append(_write_png(draw_classes(image, classmap, colours), out_dir / f"{path.stem}.png"))
        Image.fromarray(classmap.numpy().astype(np.uint8), mode="L").save(out_dir / f"{path.stem}_classes.png")
    return written


def _read(path: Path, skipped: list[str] | None) -> torch.Tensor | None:
    """(3, H, W) uint8 of `path`; None (the error noted in `skipped`) for a file that cannot be read."""
    try:
        return read_rgb(path).as_subclass(torch.Tensor)
    except BadImageError as e:
        if skipped is None:
            raise
        skipped.append(str(e))
        return None


def _write_png(image: torch.Tensor, path: Path) -> Path:
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path

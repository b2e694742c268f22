"""Metrics: COCO box and mask mAP through pycocotools, per-class IoU and mIoU from a confusion matrix."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

# COCOeval.stats positions -> our names
_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR1": 6, "AR10": 7, "AR100": 8}


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().float().cpu()
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()


class CocoEvaluator:
    """Accumulates (targets, predictions) per image and scores them with pycocotools' COCOeval.

    targets: dicts with "boxes" (N, 4) XYXY, "labels" (N,), optional "masks" (N, H, W), "iscrowd" (N,), "image_id".
    predictions: torchvision detector outputs: "boxes", "labels", "scores", optional "masks" (N, 1, H, W) in
    [0, 1], binarised at `mask_threshold`. Labels are the category ids (0 = background never appears).
    """

    def __init__(self, iou_types: tuple[str, ...] = ("bbox", "segm"), mask_threshold: float = 0.5):
        self.iou_types, self.mask_threshold = iou_types, mask_threshold
        self.images: list[dict] = []
        self.gts: list[dict] = []
        self.dets: dict[str, list[dict]] = {t: [] for t in iou_types}

    def update(self, targets: list[dict], predictions: list[dict]) -> None:
        for target, pred in zip(targets, predictions):
            image_id = len(self.images) + 1  # our own ids: the datasets' may repeat across splits
            h, w = _canvas(target, pred)
            self.images.append({"id": image_id, "height": h, "width": w})
            masks = target.get("masks")
            crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.int64))
            for j, (box, label) in enumerate(zip(_xywh(target["boxes"]), target["labels"].tolist())):
                ann = {"id": len(self.gts) + 1, "image_id": image_id, "category_id": int(label), "bbox": box}
                ann["iscrowd"] = int(crowd[j])
                if masks is not None and "segm" in self.iou_types:
                    m = masks[j].cpu().numpy() > 0
                    ann["segmentation"], ann["area"] = _rle(m), float(m.sum())
                else:
                    ann["area"] = box[2] * box[3]
                self.gts.append(ann)
            scores, labels = pred["scores"].tolist(), pred["labels"].tolist()
            if "bbox" in self.iou_types:
                for box, s, c in zip(_xywh(pred["boxes"]), scores, labels):
                    self.dets["bbox"].append({"image_id": image_id, "category_id": int(c), "bbox": box, "score": s})
            if "segm" in self.iou_types:
                if "masks" not in pred:
                    raise ValueError("segm evaluation needs predicted masks (a Mask R-CNN), got boxes only")
                binary = (pred["masks"][:, 0] > self.mask_threshold).cpu().numpy()
                for m, s, c in zip(binary, scores, labels):
                    self.dets["segm"].append(
                        {"image_id": image_id, "category_id": int(c), "segmentation": _rle(m), "score": s}
                    )

    def compute(self) -> dict[str, float]:
        """{"box_AP", "box_AP50", ..., "mask_AP", ...} in [0, 1]; NaN where COCO leaves a value undefined
        (no ground truth of that kind); 0 when there is ground truth but no detection."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        cats = sorted({a["category_id"] for a in self.gts} | {d["category_id"] for t in self.dets.values() for d in t})
        gt = COCO()
        gt.dataset = {"images": self.images, "annotations": self.gts, "categories": [{"id": c} for c in cats]}
        out = {}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            for iou_type in self.iou_types:
                prefix = "box" if iou_type == "bbox" else "mask"
                if not self.dets[iou_type]:
                    has_gt = any(not a["iscrowd"] for a in self.gts)
                    out.update({f"{prefix}_{k}": 0.0 if has_gt else float("nan") for k in _STATS})
                    continue
                ev = COCOeval(gt, gt.loadRes(self.dets[iou_type]), iou_type)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                out.update({f"{prefix}_{k}": _nan(ev.stats[i]) for k, i in _STATS.items()})
        return out


def _canvas(target: dict, pred: dict) -> tuple[int, int]:
    for d, key in ((target, "masks"), (pred, "masks")):
        if key in d and d[key].ndim >= 3:
            return tuple(d[key].shape[-2:])
    boxes = getattr(target["boxes"], "canvas_size", None)
    return tuple(boxes) if boxes else (1, 1)


def _nan(v: float) -> float:
    return float("nan") if v < 0 else float(v)


class ConfusionMatrix:
    """Pixel counts (num_classes x num_classes, rows = truth) over every update; `ignore_index` pixels skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer class maps of the same shape (predictions: logits.argmax(1))."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        if len(t) and (t.min() < 0 or t.max() >= self.num_classes):
            bad = sorted(set(t.unique().tolist()) - set(range(self.num_classes)))
            raise ValueError(f"label ids {bad} are outside 0..{self.num_classes - 1} and not {self.ignore_index}")
        self.mat += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).view(self.num_classes, -1)

    def compute(self) -> dict:
        """{"mIoU", "aAcc" (pixel accuracy), "mAcc" (mean class accuracy), "IoU": per-class list}.

        A class with no pixel in the labels nor the predictions has IoU NaN and is left out of the means.
        """
        m = self.mat.double()
        tp, truth, predicted = m.diag(), m.sum(1), m.sum(0)
        union = truth + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(truth > 0, tp / truth.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "mIoU": float(iou.nanmean()) if (~iou.isnan()).any() else float("nan"),
            "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mAcc": float(acc.nanmean()) if (~acc.isnan()).any() else float("nan"),
            "IoU": iou.tolist(),
        }

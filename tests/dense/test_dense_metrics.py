"""COCO box/mask AP through pycocotools and mIoU, against cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from convnext.dense.metrics import CocoEvaluator, ConfusionMatrix


def _t(boxes, labels=None, masks=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    out = {"boxes": boxes, "labels": torch.tensor(labels or [1] * len(boxes))}
    if masks is not None:
        out["masks"] = masks
    return out


def _p(boxes, scores=None, labels=None, masks=None):
    out = _t(boxes, labels, masks)
    out["scores"] = torch.tensor(scores or [0.9] * len(out["boxes"]))
    return out


def _box_ap(targets, preds):
    ev = CocoEvaluator(("bbox",))
    ev.update(targets, preds)
    r = ev.compute()
    return r["box_AP"], r["box_AP50"], r["box_AP75"]


def test_box_iou_by_hand():
    # [0,0,100,100] vs [0,0,62,100]: intersection 6200, union 10000
    assert box_iou(torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[0.0, 0, 62, 100]])).item() == pytest.approx(0.62)


def test_perfect_detection_scores_one():
    assert _box_ap([_t([[0, 0, 100, 100]])], [_p([[0, 0, 100, 100]])]) == pytest.approx((1.0, 1.0, 1.0))


def test_iou_062_counts_at_thresholds_050_055_060_only():
    # matched at IoU thresholds 0.50, 0.55, 0.60 (3 of the 10): AP = 0.3, AP50 = 1, AP75 = 0
    assert _box_ap([_t([[0, 0, 100, 100]])], [_p([[0, 0, 62, 100]])]) == pytest.approx((0.3, 1.0, 0.0))


def test_half_recall_is_51_of_101_recall_points():
    # two objects, one found with precision 1: the 101-point curve is 1 at recall 0..0.50 (51 points), then 0
    ap = _box_ap([_t([[0, 0, 100, 100], [200, 200, 300, 300]])], [_p([[0, 0, 100, 100]])])
    assert ap == pytest.approx((51 / 101,) * 3)


def test_false_positive_ranked_first_halves_precision():
    # the 0.95 detection is wrong, the 0.5 one right: at recall 1 precision is 1/2 -> AP 0.5
    preds = [_p([[500, 500, 600, 600], [0, 0, 100, 100]], scores=[0.95, 0.5])]
    assert _box_ap([_t([[0, 0, 100, 100]])], preds) == pytest.approx((0.5, 0.5, 0.5))


def test_wrong_class_and_no_detection_score_zero():
    assert _box_ap([_t([[0, 0, 100, 100]], [1])], [_p([[0, 0, 100, 100]], labels=[2])])[0] == 0.0
    assert _box_ap([_t([[0, 0, 100, 100]])], [_p([])]) == (0.0, 0.0, 0.0)


def test_no_ground_truth_anywhere_is_nan():
    assert all(math.isnan(v) for v in _box_ap([_t([])], [_p([])]))


def test_mask_ap_uses_the_masks_not_the_boxes():
    gt = torch.zeros(1, 20, 20, dtype=torch.uint8)
    gt[0, 5:15, 5:15] = 1  # 100 px
    good = gt[:, None].float()
    half = torch.zeros(1, 1, 20, 20)
    half[0, 0, 5:15, 5:10] = 0.9  # 50 px inside the object: mask IoU 0.5, box identical
    for pred_mask, expected in ((good, 1.0), (half, 0.1)):  # IoU 0.5 counts only at threshold 0.50
        ev = CocoEvaluator(("bbox", "segm"))
        ev.update([_t([[5, 5, 15, 15]], masks=gt)], [_p([[5, 5, 15, 15]], masks=pred_mask)])
        r = ev.compute()
        assert r["box_AP"] == pytest.approx(1.0) and r["mask_AP"] == pytest.approx(expected)


def test_images_accumulate_across_updates():
    ev = CocoEvaluator(("bbox",))
    ev.update([_t([[0, 0, 10, 10]])], [_p([[0, 0, 10, 10]])])
    ev.update([_t([[0, 0, 10, 10]])], [_p([])])  # second image: missed
    assert ev.compute()["box_AP"] == pytest.approx(51 / 101)


def test_miou_by_hand():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm.update(pred, target)
    r = cm.compute()
    # IoU = tp / (truth + predicted - tp): class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1)
    assert r["IoU"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["aAcc"] == pytest.approx(4 / 6) and r["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_absent_class_is_left_out_of_the_mean_and_bad_input_is_refused():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    r = cm.compute()
    assert r["mIoU"] == 1.0 and math.isnan(r["IoU"][2]) and math.isnan(r["IoU"][3])
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"label ids \[7\]"):
        cm.update(torch.zeros(2), torch.tensor([0, 7]))

"""Datasets: targets from instance masks, COCO JSON, label PNGs, and every bad-input case named in the issue."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from convnext.dense.coco import CocoDetection
from convnext.dense.data import (
    InstanceMaskFolder,
    LabelSpec,
    SegmentationFolder,
    camvid,
    clean_instances,
    detection_transforms,
    pennfudan,
    segmentation_transforms,
    split_indices,
)

from .conftest import SHARED_DATA


def test_boxes_and_masks_from_instance_pngs(instance_folder):
    ds = pennfudan(instance_folder)
    assert len(ds) == 6 and ds.num_instances == 0 + 1 + 2 + 0 + 1 + 2
    image, target = ds[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 80, 96)
    masks = target["masks"]
    assert masks.shape == (2, 80, 96) and target["labels"].tolist() == [1, 1]
    for box, mask in zip(target["boxes"], masks):  # the box is the mask's extent in pixel edges
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert (box[2] - box[0], box[3] - box[1]) == (20, 36)


def test_image_without_objects_gives_empty_targets(instance_folder):
    image, target = pennfudan(instance_folder, detection_transforms(True))[0]
    assert image.dtype == torch.float32
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, 80, 96)


def test_one_pixel_instance_has_a_one_pixel_box(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "im" / "x.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[3:9, 5] = 1
    Image.fromarray(mask, mode="L").save(tmp_path / "m" / "x_mask.png")
    _, target = InstanceMaskFolder(tmp_path / "im", tmp_path / "m")[0]
    assert target["boxes"].tolist() == [[5.0, 3.0, 6.0, 9.0]]


def test_flip_moves_boxes_and_masks_together(instance_folder):
    ds = pennfudan(instance_folder, detection_transforms(False))
    _, plain = ds[1]
    torch.manual_seed(0)
    flips = [pennfudan(instance_folder, detection_transforms(True))[1][1] for _ in range(8)]
    flipped = next(t for t in flips if not torch.equal(t["boxes"], plain["boxes"]))
    x0, y0, x1, y1 = plain["boxes"][0].tolist()
    assert flipped["boxes"][0].tolist() == [96 - x1, y0, 96 - x0, y1]
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))


def test_mask_size_mismatch_names_both_files(instance_folder):
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(instance_folder / "PedMasks" / "img3_mask.png")
    with pytest.raises(ValueError, match=r"img3\.png is 96x80 but .*img3_mask\.png is 10x10"):
        pennfudan(instance_folder)


def test_missing_mask_and_unreadable_image_are_named(instance_folder):
    (instance_folder / "PedMasks" / "img4_mask.png").unlink()
    with pytest.raises(ValueError, match="have no mask.*img4_mask.png"):
        pennfudan(instance_folder)
    (instance_folder / "PNGImages" / "img4.png").unlink()
    (instance_folder / "PNGImages" / "img5.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"img5\.png: cannot read image"):
        pennfudan(instance_folder)


def test_split_is_seeded_and_disjoint():
    train, test = split_indices(170, 50, seed=0)
    assert (len(train), len(test)) == (120, 50) and not set(train) & set(test)
    assert split_indices(170, 50, seed=0) == (train, test) and split_indices(170, 50, seed=1) != (train, test)
    with pytest.raises(ValueError, match="leaves nothing"):
        split_indices(10, 10)


def test_clean_instances_clips_and_drops():
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[-5.0, 2, 10, 8], [90, 10, 120, 20], [3, 3, 3.5, 9], [120, 0, 130, 5]]),
        format="XYXY",
        canvas_size=(30, 100),
    )
    masks = torch.ones(4, 30, 100, dtype=torch.uint8)
    masks[1] = 0  # an empty mask drops its instance too
    out = clean_instances({"boxes": boxes, "labels": torch.arange(4), "masks": masks}, (30, 100))
    assert out["boxes"].tolist() == [[0.0, 2.0, 10.0, 8.0]] and out["labels"].tolist() == [0]
    assert out["masks"].shape == (1, 30, 100)


def test_coco_json(coco_folder):
    ds = CocoDetection(coco_folder / "images", coco_folder / "ann.json")
    assert ds.names == ["background", "dog", "cat"]
    _, t = ds[0]
    # kept: the cat square, and the dog box clipped at the right edge; dropped: the 0.5 px box, the cat with an
    # empty segmentation, and the crowd region (training leaves crowds out)
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[10.0, 10.0, 30.0, 30.0], [50.0, 40.0, 64.0, 50.0]]
    assert t["masks"].shape == (2, 64, 64) and t["masks"][0].sum() > 0
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)
    with_crowd = CocoDetection(coco_folder / "images", coco_folder / "ann.json", keep_crowd=True)[0][1]
    assert with_crowd["iscrowd"].tolist() == [0, 0, 1]


def test_coco_bad_files_are_named(coco_folder):
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(coco_folder / "images" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png is 48x32 but .*ann\.json says 64x64"):
        CocoDetection(coco_folder / "images", coco_folder / "ann.json")
    (coco_folder / "images" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) not found in .*images: 'b\.png' \(id 2\)$"):
        CocoDetection(coco_folder / "images", coco_folder / "ann.json")
    (coco_folder / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a COCO annotation file"):
        CocoDetection(coco_folder / "images", coco_folder / "bad.json")


SPEC = LabelSpec(num_classes=3, ignore_ids=(3,))


def test_label_folder_maps_void_to_ignore(label_folder):
    ds = SegmentationFolder(label_folder / "images", label_folder / "labels", SPEC)
    image, label = ds[0]
    assert image.shape == (3, 64, 80) and label.shape == (64, 80) and label.dtype == torch.int64
    assert set(label.unique().tolist()) == {0, 1, 2, 255} and (label[:2] == 255).all()


def test_unknown_label_ids_error_or_ignore(label_folder):
    bad = np.array(Image.open(label_folder / "labels" / "s2.png"))
    bad[10:12, 10:12] = 9
    bad[20, 20] = 7
    Image.fromarray(bad, mode="L").save(label_folder / "labels" / "s2.png")
    with pytest.raises(ValueError, match=r"s2\.png: class ids \[7, 9\]"):
        SegmentationFolder(label_folder / "images", label_folder / "labels", SPEC)
    spec = LabelSpec(num_classes=3, ignore_ids=(3,), unknown_ids="ignore")
    _, label = SegmentationFolder(label_folder / "images", label_folder / "labels", spec)[2]
    assert label[10, 10] == 255 and label[20, 20] == 255


def test_label_size_mismatch_and_missing_and_rgb_labels(label_folder):
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(label_folder / "labels" / "s1.png")
    with pytest.raises(ValueError, match=r"s1\.jpg is 80x64 but .*s1\.png is 12x10"):
        SegmentationFolder(label_folder / "images", label_folder / "labels", SPEC)
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(label_folder / "labels" / "s1.png")
    with pytest.raises(ValueError, match=r"s1\.png: expected a single-channel PNG"):
        SegmentationFolder(label_folder / "images", label_folder / "labels", SPEC)
    (label_folder / "labels" / "s1.png").unlink()
    with pytest.raises(ValueError, match="have no label PNG.*s1.jpg"):
        SegmentationFolder(label_folder / "images", label_folder / "labels", SPEC)


def test_image_folders_list_their_own_image_files_only(label_folder):
    """Images and labels as `data.decode.find_images` lists a folder (not its subfolders; any image extension, no
    hidden files); a folder with no images, or none at all, is named."""
    images, labels = label_folder / "images", label_folder / "labels"
    (images / "._s0.jpg").write_bytes(b"macOS metadata")  # a hidden file named like an image
    (images / "notes.txt").write_text("not an image")
    (images / "extra").mkdir()
    Image.open(images / "s0.jpg").save(images / "extra" / "s9.jpg")  # no label: read, it would be an error
    ds = SegmentationFolder(images, labels, SPEC)
    assert [p.name for p in ds.images] == ["s0.jpg", "s1.jpg", "s2.jpg", "s3.jpg"]
    for p in labels.iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match=f"no image files .* in {labels}$"):
        SegmentationFolder(images, labels, SPEC)
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        SegmentationFolder(label_folder / "nowhere", labels, SPEC)


def test_segmentation_train_transform_crops_pads_with_ignore(label_folder):
    tf = segmentation_transforms(True, (48, 96), scale_range=(0.5, 0.5))  # smaller than the crop: padded
    image, label = SegmentationFolder(label_folder / "images", label_folder / "labels", SPEC, tf)[0]
    assert image.shape == (3, 48, 96) and image.dtype == torch.float32 and label.shape == (48, 96)
    assert (label == 255).any() and set(label.unique().tolist()) <= {0, 1, 2, 255}


def _extract(name: str, tmp_path: Path) -> Path:
    tar = SHARED_DATA / name
    if not tar.is_file():
        pytest.skip(f"real data not here: {tar}")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, filter="data")
    return tmp_path


def test_real_pennfudan(tmp_path):
    ds = pennfudan(_extract("pennfudan.tar", tmp_path))
    assert (len(ds), ds.num_instances) == (170, 423)


def test_real_camvid(tmp_path):
    root = _extract("camvid.tar", tmp_path)
    sizes = {s: len(camvid(root, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 367, "val": 101, "test": 233}


def test_coco_short_polygons_dropped_when_built(coco_folder, caplog):
    """Polygons pycocotools cannot rasterise (1 or 2 points, odd or non-numeric coordinates) are removed when the
    dataset is built and counted; an instance left with none is dropped like one with an empty mask."""
    data = json.loads((coco_folder / "ann.json").read_text())
    data["annotations"][0]["segmentation"] = [[10, 10], [10, 10, 30, 10], [10, 10, 30, 10, 30, 30, 10, 30]]
    data["annotations"][1]["segmentation"] = [[50, 40, 64, 40, 64], [50, "x", 64, 40, 64, 50]]
    (coco_folder / "ann.json").write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="convnext.dense.coco"):
        ds = CocoDetection(coco_folder / "images", coco_folder / "ann.json")
    assert ds.dropped_polygons == 4 and "dropped 4 polygons of fewer than 3 points" in caplog.text
    _, t = ds[0]
    assert t["labels"].tolist() == [2] and t["masks"][0].sum() > 0  # the cat keeps its square; the dog has none

"""Malformed dense inputs (issue 39, item 5): each is refused when the dataset is built with one line naming the file,
the entry's id and the field, never a pycocotools assertion or a KeyError/TypeError traceback; annotations that
point at no image are counted and named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from convnext.cli import main
from convnext.dense.coco import CocoDetection
from convnext.dense.data import LabelSpec, SegmentationFolder, pennfudan

NAN, INF = float("nan"), float("inf")


def coco_error(root: Path, data: Any, masks: bool = True) -> str:
    """Write `data` as root/ann.json and build the dataset on it: the ValueError's message, checked to be one line
    (any other exception, such as a KeyError or pycocotools' AssertionError, fails the test)."""
    (root / "ann.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        CocoDetection(root / "images", root / "ann.json", masks=masks)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def coco_data(root: Path) -> dict:
    """The good file of `write_coco` (conftest): images 1 (a.png) and 2 (b.png), annotations 1-5, categories 7 and 3."""
    return json.loads((root / "ann.json").read_text())


@pytest.mark.parametrize(
    ("top", "kind"), [([], "a list"), ([{"images": []}], "a list"), ("coco", "a string"), (3, "a number")]
)
def test_coco_file_that_is_not_an_object_is_named(coco_folder, top, kind):
    assert coco_error(coco_folder, top) == (
        f"{coco_folder / 'ann.json'}: not a COCO annotation file (the top level is {kind}, expected an object with "
        "'images', 'annotations' and 'categories')"
    )


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_file_without_a_section_is_named(coco_folder, key):
    data = coco_data(coco_folder)
    del data[key]
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: not a COCO annotation file (no {key!r})"
    data[key] = {"1": "x"}
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: {key!r} must be a list, got an object"


def test_coco_missing_bbox_names_the_annotation(coco_folder):
    data = coco_data(coco_folder)
    del data["annotations"][2]["bbox"]
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: annotation 3 has no 'bbox'"


def test_coco_missing_file_name_names_the_image(coco_folder):
    data = coco_data(coco_folder)
    del data["images"][1]["file_name"]
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: image 2 has no 'file_name'"


@pytest.mark.parametrize(
    ("section", "index", "field", "expected"),
    [
        ("annotations", 1, "id", "annotations[1] has no 'id'"),
        ("annotations", 1, "image_id", "annotation 2 has no 'image_id'"),
        ("annotations", 1, "category_id", "annotation 2 has no 'category_id'"),
        ("images", 0, "id", "images[0] has no 'id'"),
        ("categories", 1, "id", "categories[1] has no 'id'"),
        ("categories", 1, "name", "category 3: 'name' must be a string, got None"),
    ],
)
def test_coco_missing_field_names_the_entry_and_field(coco_folder, section, index, field, expected):
    data = coco_data(coco_folder)
    del data[section][index][field]
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: {expected}"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("image_id", "1", "annotation 2: 'image_id' must be an integer, got '1'"),
        ("category_id", 3.0, "annotation 2: 'category_id' must be an integer, got 3.0"),
        ("iscrowd", 2, "annotation 2: 'iscrowd' must be 0 or 1, got 2"),
        (
            "segmentation",
            "polygon",
            "annotation 2: 'segmentation' must be a list of polygons or an RLE object, got a string",
        ),
    ],
)
def test_coco_mistyped_annotation_field_names_it(coco_folder, field, value, expected):
    data = coco_data(coco_folder)
    data["annotations"][1][field] = value
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: {expected}"


def test_coco_category_id_not_among_the_categories_is_named(coco_folder):
    data = coco_data(coco_folder)
    data["annotations"][3]["category_id"] = 5
    assert (
        coco_error(coco_folder, data)
        == f"{coco_folder / 'ann.json'}: annotation 4: 'category_id' 5 is not a category's id (3, 7)"
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["images"].append(dict(d["images"][0])), "image id 1 appears twice"),
        (lambda d: d["categories"].append({"id": 7, "name": "lion"}), "category id 7 appears twice"),
        (lambda d: d.update(categories=[]), "'categories' is empty (detection needs at least one class)"),
        (lambda d: d.update(images=[]), "'images' is empty"),
        (lambda d: d["images"][0].update(width=0), "image 1: 'width' must be a positive integer, got 0"),
        (lambda d: d["annotations"].append(7), "annotations[5] must be an object, got a number"),
    ],
    ids=["duplicate_image_id", "duplicate_category_id", "no_categories", "no_images", "zero_width", "not_an_object"],
)
def test_coco_other_malformed_entries_are_one_line(coco_folder, edit, expected):
    data = coco_data(coco_folder)
    edit(data)
    assert coco_error(coco_folder, data) == f"{coco_folder / 'ann.json'}: {expected}"


def test_coco_annotations_of_no_image_are_counted_and_named(coco_folder, caplog):
    data = coco_data(coco_folder)
    extra = [{"id": 10 + k, "image_id": 9, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0} for k in range(7)]
    data["annotations"] += extra
    (coco_folder / "ann.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="convnext.dense.data"):
        ds = CocoDetection(coco_folder / "images", coco_folder / "ann.json")
    assert ds.orphans == 7
    assert caplog.messages == [
        f"{coco_folder / 'ann.json'}: 7 annotation(s) point at no image and are left out: annotation 10 (image_id 9), "
        "annotation 11 (image_id 9), annotation 12 (image_id 9), annotation 13 (image_id 9), annotation 14 (image_id 9)"
        ", ... (7 in all)"
    ]
    assert ds[0][1]["labels"].tolist() == [2, 1] and len(ds[1][1]["labels"]) == 0  # the others as before


@pytest.mark.parametrize(("value", "shown"), [(NAN, "nan"), (INF, "inf"), (-INF, "-inf")])
def test_coco_bbox_with_nan_or_infinite_value_is_refused(coco_folder, value, shown):
    data = coco_data(coco_folder)
    data["annotations"][0]["bbox"][1] = value
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 1: 'bbox' [10, {shown}, 20, 20] has a value that is not finite"
    )


@pytest.mark.parametrize(
    ("bbox", "shown"),
    [([10, 10, 20], "[10, 10, 20]"), ([10, 10, 20, "20"], "[10, 10, 20, '20']"), ("10,10,20,20", "'10,10,20,20'"),
     ([10, 10, 20, True], "[10, 10, 20, True]"), (None, "None")],
)  # fmt: skip
def test_coco_bbox_that_is_not_four_numbers_is_refused(coco_folder, bbox, shown):
    data = coco_data(coco_folder)
    data["annotations"][0]["bbox"] = bbox
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 1: 'bbox' must be 4 numbers [x, y, width, height], got {shown}"
    )


def test_coco_bbox_with_negative_width_or_height_is_refused(coco_folder):
    data = coco_data(coco_folder)
    data["annotations"][1]["bbox"] = [50, 40, 30, -10]
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 2: 'bbox' [50, 40, 30, -10] has a negative width or height"
    )


@pytest.mark.parametrize(("value", "shown"), [(NAN, "nan"), (INF, "inf")])
def test_coco_polygon_with_nan_or_infinite_value_is_refused(coco_folder, value, shown):
    """pycocotools would rasterise a NaN to a huge span: before this check the process was killed for memory."""
    data = coco_data(coco_folder)
    data["annotations"][0]["segmentation"] = [[1, 1, 2, 1, 2, 2], [10, 10, 30, value, 30, 30]]
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 1: 'segmentation' polygon 1 has a value that is not finite: {shown}"
    )
    assert len(CocoDetection(coco_folder / "images", coco_folder / "ann.json", masks=False)) == 2  # boxes only: unread


def test_coco_polygon_far_outside_its_image_is_refused(coco_folder):
    data = coco_data(coco_folder)
    data["annotations"][0]["segmentation"] = [[10, 10, 1e9, 10, 30, 30]]
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 1: 'segmentation' polygon 0 has the coordinate 1000000000.0, far "
        "outside the 64x64 image"
    )
    data["annotations"][0]["segmentation"] = [[-3, -3, 66, -3, 66, 66]]  # just past the edges: clipped as before
    (coco_folder / "ann.json").write_text(json.dumps(data))
    assert CocoDetection(coco_folder / "images", coco_folder / "ann.json")[0][1]["masks"][0].sum() > 0


def test_coco_rle_of_another_size_is_refused(coco_folder):
    data = coco_data(coco_folder)
    data["annotations"][4]["segmentation"] = {"counts": [0, 100], "size": [10, 10]}
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 5: 'segmentation' RLE size [10, 10] is not the image's "
        "[height, width] [64, 64]"
    )
    data["annotations"][4]["segmentation"] = {"counts": [0, 100], "size": [64, 64]}
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: annotation 5: 'segmentation' RLE counts must be integers >= 0 adding up to "
        "height x width = 4096"
    )
    data["annotations"][4]["segmentation"] = {"counts": [2000, 96, 2000], "size": [64, 64]}  # a good crowd RLE
    (coco_folder / "ann.json").write_text(json.dumps(data))
    crowd = CocoDetection(coco_folder / "images", coco_folder / "ann.json", keep_crowd=True)[0][1]
    assert crowd["iscrowd"].tolist() == [0, 0, 1] and crowd["masks"][2].sum() == 96


def test_coco_images_missing_from_the_folder_are_counted_and_named(coco_folder):
    data = coco_data(coco_folder)
    data["images"] += [{"id": 10 + k, "file_name": f"gone{k}.png"} for k in range(5)]
    (coco_folder / "images" / "b.png").unlink()
    assert coco_error(coco_folder, data) == (
        f"{coco_folder / 'ann.json'}: 6 image(s) not found in {coco_folder / 'images'}: 'b.png' (id 2), "
        "'gone0.png' (id 10), 'gone1.png' (id 11), 'gone2.png' (id 12), 'gone3.png' (id 13), ... (6 in all)"
    )


def _no_bbox(data: dict) -> None:
    del data["annotations"][2]["bbox"]


def _no_file_name(data: dict) -> None:
    del data["images"][1]["file_name"]


def _nan_bbox(data: dict) -> None:
    data["annotations"][0]["bbox"][1] = NAN


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda data: [data], "not a COCO annotation file (the top level is a list"),  # was pycocotools' AssertionError
        (_no_bbox, "annotation 3 has no 'bbox'"),  # was "error: 'bbox'"
        (_no_file_name, "image 2 has no 'file_name'"),  # was "error: file_name"
        (_nan_bbox, "annotation 1: 'bbox' [10, nan, 20, 20] has a value that is not finite"),  # was accepted
    ],
    ids=["json-list", "missing-bbox", "missing-file_name", "nan-bbox"],
)
def test_detect_train_cli_on_a_malformed_coco_file_prints_one_line(coco_folder, tmp_path, capsys, edit, expected):
    """The probes as a user met them: `convnext detect train` on a malformed COCO file is one line naming the file,
    the entry and the field, exit code 2, and no run folder."""
    data = coco_data(coco_folder)
    data = edit(data) or data
    (coco_folder / "bad.json").write_text(json.dumps(data))
    images, good, bad = coco_folder / "images", coco_folder / "ann.json", coco_folder / "bad.json"
    args = ["detect", "train", "--output", str(tmp_path / "run"), "--model", "convnext_atto", "--data.format", "coco",
            "--data.train_images", str(images), "--data.train_ann", str(good),
            "--data.val_images", str(images), "--data.val_ann", str(bad)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"convnext detect: error: {bad}: {expected}") and "\n" not in err, err
    assert not (tmp_path / "run").exists()


# --- folders of images with instance masks or label PNGs -------------------------------------------------------


def test_empty_mask_file_is_named(instance_folder):
    (instance_folder / "PedMasks" / "img2_mask.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^\S*img2_mask\.png: cannot read image \("):
        pennfudan(instance_folder)


def test_two_images_with_one_stem_are_named(instance_folder, label_folder):
    Image.open(instance_folder / "PNGImages" / "img1.png").save(instance_folder / "PNGImages" / "img1.jpg")
    with pytest.raises(ValueError) as e:
        pennfudan(instance_folder)
    assert str(e.value) == (
        f"{instance_folder / 'PNGImages'}: img1.jpg and img1.png have the same stem; images pair with masks and "
        "labels by stem, so keep one"
    )
    Image.open(label_folder / "labels" / "s0.png").save(label_folder / "labels" / "s0.bmp")
    with pytest.raises(ValueError, match=r"labels: s0\.bmp and s0\.png have the same stem"):
        SegmentationFolder(label_folder / "images", label_folder / "labels", LabelSpec(3, ignore_ids=(3,)))


@pytest.mark.parametrize("value", [70000, -3])
def test_label_ids_outside_16_bits_are_named(tmp_path, value):
    """A 32-bit TIFF label can hold them; ignored as unknown ids they would index past the label table mid-epoch."""
    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im" / "x.png")
    ids = np.zeros((8, 8), np.int32)
    ids[2, 2] = value
    Image.fromarray(ids, mode="I").save(tmp_path / "lab" / "x.tif")
    spec = LabelSpec(3, unknown_ids="ignore")
    with pytest.raises(ValueError) as e:
        SegmentationFolder(tmp_path / "im", tmp_path / "lab", spec)
    assert (
        str(e.value) == f"{tmp_path / 'lab' / 'x.tif'}: ids must be in 0..65535, found {min(value, 0)}..{max(value, 0)}"
    )

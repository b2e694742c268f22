"""COCO detection data: a COCO-style JSON (boxes, polygons or RLE masks) read and checked entry by entry when the
dataset is built, each problem a ValueError of one line naming the file, the annotation (image, category) id and
the field: not an object with `images`, `annotations` and `categories` lists, a missing or mistyped id, `file_name`,
`category_id` or `bbox`, a category not listed, a bbox that is not 4 finite numbers or has a negative side, a
polygon value that is not finite or lies far outside its image, an RLE not of its image's size. Image files not
found are listed together (count and names); annotations whose `image_id` is no image's are left out with a
warning that counts and names them. Masks are decoded by pycocotools; the rest of the dense data is `data.py`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from convnext.dense.data import Transform, clean_instances, image_size, read_rgb

log = logging.getLogger(__name__)


class CocoDetection(Dataset):
    """A COCO-style JSON: `images` (id, file_name, optional width and height), `annotations` (id, image_id,
    category_id, bbox XYWH, optional segmentation and iscrowd), `categories` (id, name). Category ids map to labels
    1..K in sorted order (0 is background); `names[label]` is the name.

    Crowd regions are left out unless `keep_crowd` (evaluation keeps them, flagged by `iscrowd`, so they are
    ignored as COCO does). With `masks`, polygons and RLE are decoded by pycocotools (and checked here first).

    The whole file is checked when the dataset is built: a problem is a ValueError of one line naming the file, the
    annotation (or image, or category) and the field. Annotations whose image_id is no image's are left out with a
    warning that counts and names them (`orphans`); polygons pycocotools cannot rasterise are removed and counted
    (`dropped_polygons`).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        masks: bool = True,
        keep_crowd: bool = False,
        transforms: Transform | None = None,
    ):
        ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.masks, self.keep_crowd, self.transforms = masks, keep_crowd, transforms
        data = _read_coco_json(ann_file)
        cats = _coco_categories(data["categories"], ann_file)
        self.cat_ids = sorted(cats)
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.names = ["background"] + [cats[c] for c in self.cat_ids]
        self.images, self.sizes = _coco_images(data["images"], ann_file, self.image_dir)
        self.ids = sorted(self.images)
        self.anns: dict[int, list[dict]] = {i: [] for i in self.ids}
        orphans: list[str] = []
        self.dropped_polygons = 0
        for i, a in enumerate(data["annotations"]):
            where = _entry_name(ann_file, "annotations", i, a)
            _int_field(a, "id", where)
            image_id = _int_field(a, "image_id", where)
            if image_id not in self.anns:
                orphans.append(f"annotation {a['id']} (image_id {image_id})")
                continue
            self.dropped_polygons += _check_annotation(a, where, self.label_of, self.sizes[image_id] if masks else None)
            self.anns[image_id].append(a)
        self.orphans = len(orphans)
        if orphans:
            log.warning(
                "%s: %d annotation(s) point at no image and are left out: %s", ann_file, len(orphans), _few(orphans)
            )
        if self.dropped_polygons:
            log.info(
                "%s: dropped %d polygons of fewer than 3 points (an instance left with no polygon is dropped too)",
                ann_file, self.dropped_polygons,
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image_id = self.ids[index]
        image = read_rgb(self.image_dir / self.images[image_id]["file_name"])
        canvas = tuple(image.shape[-2:])
        anns = [a for a in self.anns[image_id] if self.keep_crowd or not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), format="XYXY", canvas_size=canvas
            ),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            ms = [self._mask(a, canvas) for a in anns]
            target["masks"] = tv_tensors.Mask(torch.stack(ms) if ms else torch.zeros((0, *canvas), dtype=torch.uint8))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, clean_instances(target, tuple(image.shape[-2:]))

    def _mask(self, ann: dict, canvas: tuple[int, int]) -> torch.Tensor:
        from pycocotools import mask as mask_utils

        seg = ann.get("segmentation")
        if not seg:  # no mask given: empty, and `clean_instances` drops the instance
            return torch.zeros(canvas, dtype=torch.uint8)
        h, w = canvas
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return torch.from_numpy(mask_utils.decode(rle).astype(np.uint8))


# --- checking a COCO file: each problem one line naming the file, the entry and the field ----------------------

_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _few(items: list[str], n: int = 5) -> str:
    """The first `n` items joined, and how many there are in all when that is more."""
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _read_coco_json(ann_file: Path) -> dict:
    """The file's JSON: an object whose `images`, `annotations` and `categories` are lists."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: no such annotation file")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file}: not a COCO annotation file (not JSON: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{ann_file}: not a COCO annotation file (the top level is {_json_kind(data)}, expected an object with "
            "'images', 'annotations' and 'categories')"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{ann_file}: not a COCO annotation file (no {key!r})")
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: {key!r} must be a list, got {_json_kind(data[key])}")
    return data


def _entry_name(ann_file: Path, key: str, i: int, entry: Any) -> str:
    """How messages name an entry: `FILE: annotation 7` by its id, or `FILE: annotations[3]` (its place in the list)
    when it has no usable id."""
    if not isinstance(entry, dict):
        raise ValueError(f"{ann_file}: {key}[{i}] must be an object, got {_json_kind(entry)}")
    return f"{ann_file}: {_SINGULAR[key]} {entry['id']}" if _is_int(entry.get("id")) else f"{ann_file}: {key}[{i}]"


def _int_field(entry: dict, key: str, where: str) -> int:
    if key not in entry:
        raise ValueError(f"{where} has no {key!r}")
    if not _is_int(entry[key]):
        raise ValueError(f"{where}: {key!r} must be an integer, got {entry[key]!r}")
    return entry[key]


def _coco_categories(items: list, ann_file: Path) -> dict[int, str]:
    """{category id: name}; ids unique, at least one category."""
    if not items:
        raise ValueError(f"{ann_file}: 'categories' is empty (detection needs at least one class)")
    cats: dict[int, str] = {}
    for i, c in enumerate(items):
        where = _entry_name(ann_file, "categories", i, c)
        cid = _int_field(c, "id", where)
        if cid in cats:
            raise ValueError(f"{ann_file}: category id {cid} appears twice")
        if not isinstance(c.get("name"), str):
            raise ValueError(f"{where}: 'name' must be a string, got {c.get('name')!r}")
        cats[cid] = c["name"]
    return cats


def _coco_images(items: list, ann_file: Path, image_dir: Path) -> tuple[dict[int, dict], dict[int, tuple[int, int]]]:
    """({image id: entry}, {image id: (height, width) read from the file's header}); every file present, with the
    width and height the JSON gives, if it gives them."""
    if not items:
        raise ValueError(f"{ann_file}: 'images' is empty")
    images: dict[int, dict] = {}
    for i, info in enumerate(items):
        where = _entry_name(ann_file, "images", i, info)
        iid = _int_field(info, "id", where)
        if iid in images:
            raise ValueError(f"{ann_file}: image id {iid} appears twice")
        if "file_name" not in info:
            raise ValueError(f"{where} has no 'file_name'")
        if not isinstance(info["file_name"], str) or not info["file_name"]:
            raise ValueError(f"{where}: 'file_name' must be a file name, got {info['file_name']!r}")
        for key in ("width", "height"):
            if key in info and not (_is_int(info[key]) and info[key] > 0):
                raise ValueError(f"{where}: {key!r} must be a positive integer, got {info[key]!r}")
        images[iid] = info
    missing = [f"{e['file_name']!r} (id {i})" for i, e in images.items() if not (image_dir / e["file_name"]).is_file()]
    if missing:
        raise ValueError(f"{ann_file}: {len(missing)} image(s) not found in {image_dir}: {_few(missing)}")
    sizes = {}
    for iid, info in images.items():
        path = image_dir / info["file_name"]
        w, h = image_size(path)
        said = (info.get("width", w), info.get("height", h))
        if said != (w, h):
            raise ValueError(f"{path} is {w}x{h} but {ann_file} says {said[0]}x{said[1]} (image id {iid})")
        sizes[iid] = (h, w)
    return images, sizes


def _check_annotation(ann: dict, where: str, label_of: dict[int, int], size: tuple[int, int] | None) -> int:
    """Check an annotation's category, bbox, iscrowd and (with the image's (height, width) `size`) segmentation;
    returns how many of its polygons were removed (`_drop_short_polygons`)."""
    cat = _int_field(ann, "category_id", where)
    if cat not in label_of:
        raise ValueError(f"{where}: 'category_id' {cat} is not a category's id ({_few([str(c) for c in label_of])})")
    if "bbox" not in ann:
        raise ValueError(f"{where} has no 'bbox'")
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {box!r}")
    if not all(map(math.isfinite, box)):
        raise ValueError(f"{where}: 'bbox' {box} has a value that is not finite")
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"{where}: 'bbox' {box} has a negative width or height")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    seg = ann.get("segmentation")
    if size is None or not seg:  # no masks wanted, or none given (an empty mask: the instance is dropped)
        return 0
    if isinstance(seg, dict):
        _check_rle(seg, where, size)
        return 0
    if not isinstance(seg, list):
        raise ValueError(f"{where}: 'segmentation' must be a list of polygons or an RLE object, got {_json_kind(seg)}")
    return _drop_short_polygons(ann, where, size)


def _check_rle(seg: dict, where: str, size: tuple[int, int]) -> None:
    """An RLE mask the size of its image; uncompressed counts (a list) must cover it exactly."""
    if seg.get("size") != list(size):
        raise ValueError(
            f"{where}: 'segmentation' RLE size {seg.get('size')!r} is not the image's [height, width] {list(size)}"
        )
    counts = seg.get("counts")
    if isinstance(counts, list):
        if not (all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == size[0] * size[1]):
            raise ValueError(
                f"{where}: 'segmentation' RLE counts must be integers >= 0 adding up to height x width "
                f"= {size[0] * size[1]}"
            )
    elif not isinstance(counts, str):
        raise ValueError(f"{where}: 'segmentation' RLE 'counts' must be a string or a list, got {counts!r}")


def _drop_short_polygons(ann: dict, where: str, size: tuple[int, int]) -> int:
    """Remove from `ann`'s polygon list those pycocotools cannot rasterise (under 3 points, an odd count of
    coordinates, values that are not numbers); returns how many were removed. A coordinate that is not finite, or
    more than the image's side outside the (height, width) `size` image (pycocotools would rasterise the whole span:
    a hang, or an out-of-memory kill), is a ValueError naming the polygon and the value."""
    seg = ann["segmentation"]
    h, w = size

    def ok(poly: Any) -> bool:
        return isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_is_number, poly))

    kept = [poly for poly in seg if ok(poly)]
    for k, poly in enumerate(seg):
        if not ok(poly):
            continue
        if not all(map(math.isfinite, poly)):
            bad = next(v for v in poly if not math.isfinite(v))
            raise ValueError(f"{where}: 'segmentation' polygon {k} has a value that is not finite: {bad}")
        xs, ys = poly[0::2], poly[1::2]
        if min(xs) < -w or max(xs) > 2 * w or min(ys) < -h or max(ys) > 2 * h:
            far = next(v for v, side in zip(poly, [w, h] * len(xs)) if not -side <= v <= 2 * side)
            raise ValueError(
                f"{where}: 'segmentation' polygon {k} has the coordinate {far}, far outside the {w}x{h} image"
            )
    ann["segmentation"] = kept
    return len(seg) - len(kept)
